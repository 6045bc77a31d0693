"""Warm Claude processes: a budget of live CLI processes per server process.

A new CLI process costs ~0.4 s before its first token and ~220 MB while it
lives; a ``ClaudeSDKClient`` kept connected between turns answers a follow-up
in ~20 ms. This module keeps such clients, within one limit:

* **warm clients**, one per thread ``(resource_id, thread_id)``: after a turn
  that ended cleanly, its client stays connected; the thread's next turn, on
  any connection or transport of this process, sends its message to the same
  CLI (no spawn, no resume). At most ``OMNI_WARM_CLIENTS`` idle ones, least
  recently used evicted first, each closed after ``OMNI_WARM_IDLE_SECONDS``
  idle, after ``OMNI_WARM_MAX_TURNS`` turns or when its CLI's RSS passes
  ``OMNI_WARM_MAX_RSS_MB`` (long-lived CLIs creep), and at once after an
  error, an unfinished interrupt, an agent change or a delete of its thread
  (at once in the deleting process; every ``MAPPING_CHECK_SECONDS`` at most
  in any other, which finds the thread's mapping gone).
* **spares**: ``OMNI_SPARE_CLIENTS`` started, unbound clients per agent preset,
  so a new thread's first turn skips the spawn too; a used spare is replaced
  in the background. A spare whose CLI has not started within
  ``OMNI_CLI_START_SECONDS`` is killed and its place freed.
* **the budget**: ``OMNI_MAX_PROCESSES`` live CLI processes in all, shared by
  running turns, warm clients and spares. A turn that needs a process when the
  budget is full evicts an idle warm client or a spare; when every process is
  busy it is refused at once with ``server_busy`` (503, ``Retry-After``).

**Never stale.** A warm client remembers the mapping's ``version`` after its
last turn. Every mapping write bumps the version, so a turn taken anywhere
else (another server process sharing the database) makes the next turn here
see a newer version: the warm client is dropped and the turn resumes cold
from the transcript store. A fork never uses its parent's client (it is keyed
by its own thread), nor a spare (it resumes the parent).

**Which process.** A client's CLI pid comes from its pid file (written by
``chat_app/bin/claude-launcher``, see :func:`client_pid`), never from the
SDK's private state; an SDK that stopped running the launcher is logged as
an error and its clients are never kept, rather than kept blind.

Everything here runs on the server's event loop; :meth:`ProcessPool.checkout`
is synchronous, so deciding and reserving a process cannot race.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from claude_agent_sdk import ClaudeSDKClient
from django.conf import settings

from sessions_app.errors import ServerBusy

from . import metrics
from .sdk import PIDFILE_ENV, cli_pidfile, process_state, read_proc

log = logging.getLogger("omni.pool")

# How often, at most, the janitor checks that the idle warm clients' threads
# still exist (a thread deleted by another process, or behind the pool's back).
MAPPING_CHECK_SECONDS = 10.0

Key = tuple[str, str]  # (resource_id, thread_id)


@dataclass(eq=False)
class WarmClient:
    """A connected ``ClaudeSDKClient`` and what it is good for."""

    client: ClaudeSDKClient
    agent: str
    session_id: str | None = None  # None: a spare, no conversation yet
    version: int | None = None  # the mapping's version after its last turn
    context: "ToolContext | None" = None  # what its tools act for (chat_app.tools)
    cost_total: float = 0.0  # its CLI's running total_cost_usd after its last turn
    turns: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int | None:
        return client_pid(self.client)

    @property
    def known_pid(self) -> int | None:
        """Its CLI's pid as read before (for log lines): no check that it still runs."""
        ident = _pids.get(self.client)
        return ident[0] if ident is not None else self.pid


def client_pid(client: ClaudeSDKClient, *, quiet: bool = False) -> int | None:
    """The CLI process id of a connected client; None if its CLI is not
    running (exited, killed, a zombie, or its pid now names another process).

    Read from the client's pid file (``chat_app/sdk.py``: the launcher writes
    it before it execs the CLI), never from the SDK's private state, and kept
    with the process's start time. A connected client without a readable pid
    file is a broken deployment (the SDK no longer runs the launcher, or
    another ``cli_path``): it is logged as an error (once) and its client is
    treated as gone, so warm reuse stops visibly, not silently. ``quiet``:
    the client may not have started its CLI yet (no error)."""
    if client in _closed:
        return None
    ident = _pids.get(client)
    if ident is None:
        ident = _read_pidfile(client, quiet)
        if ident is None:
            return None
        _pids[client] = ident
    pid, started = ident
    state = process_state(pid)
    if state is None or state[0] in ("Z", "X") or state[1] != started:
        return None  # exited, dead but not yet reaped, or the pid was reused
    return pid


_pids: "weakref.WeakKeyDictionary[ClaudeSDKClient, tuple[int, int]]" = weakref.WeakKeyDictionary()
_closed: "weakref.WeakSet[ClaudeSDKClient]" = weakref.WeakSet()  # pid file removed
_complained: set[str] = set()


def _read_pidfile(client: ClaudeSDKClient, quiet: bool) -> tuple[int, int] | None:
    path = cli_pidfile(getattr(client, "options", None))
    if path is None:
        _complain("a client's options carry no %s (built without chat_app.sdk.build_options?): "
                  "its CLI cannot be found, so it is never kept warm or killed by pid", PIDFILE_ENV)
        return None
    try:
        pid, started = (int(part) for part in path.read_text().split())
    except FileNotFoundError:
        if not quiet:
            _complain("no pid file %s for a connected client: the SDK did not start the CLI "
                      "through chat_app/bin/claude-launcher (an SDK upgrade?); warm clients and "
                      "kills of hung CLIs do not work until it does", path)
        return None
    except (OSError, ValueError):
        if not quiet:  # empty: the launcher is writing it this instant
            _complain("unreadable pid file %s: warm clients and kills of hung CLIs do not work", path)
        return None
    weakref.finalize(client, _unlink, path)  # never left behind, whatever happens to the client
    return pid, started


def _complain(message: str, *args) -> None:
    """Log an error the first time it happens in this process."""
    if message not in _complained:
        _complained.add(message)
        log.error("[POOL] " + message, *args)


def _forget_pid(client: ClaudeSDKClient) -> None:
    """The client is closed: its pid file goes (its pid is None from now on)."""
    _closed.add(client)
    _pids.pop(client, None)
    if (path := cli_pidfile(getattr(client, "options", None))) is not None:
        _unlink(path)


def _unlink(path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        status = read_proc(f"/proc/{pid}/status")
    except OSError:
        return 0.0
    start = status.find(b"\nVmRSS:")
    if start < 0:
        return 0.0
    return int(status[start + 7:status.index(b"\n", start + 1)].split()[0]) / 1024


class Slot:
    """A turn's claim on one live process: the warm client or spare it was
    given, or the right to start one. Given back exactly once, with
    :meth:`ProcessPool.checkin` or :meth:`ProcessPool.discard`."""

    def __init__(self, warm: WarmClient | None, kind: str):
        self.warm = warm
        self.kind = kind  # "warm", "spare" or "cold"
        self.returned = False

    def take(self) -> WarmClient | None:
        """The warm client or spare to run on (once); None: start a new one."""
        warm, self.warm = self.warm, None
        return warm


class ProcessPool:
    def __init__(self):
        self.idle: OrderedDict[Key, WarmClient] = OrderedDict()  # LRU first
        self.spares: dict[str, list[WarmClient]] = {}
        self.busy = 0  # processes held by running turns (or being started for them)
        self.starting = 0  # spares being started
        self._closing: set[asyncio.Task] = set()  # closed, their CLI not yet exited
        self._closing_clients: dict[asyncio.Task, WarmClient] = {}
        self._exited = asyncio.Event()  # set (and replaced) whenever one has
        self._filling: asyncio.Task | None = None
        self._janitor: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    # --- accounting --------------------------------------------------------
    @property
    def spare_count(self) -> int:
        return sum(len(s) for s in self.spares.values())

    @property
    def committed(self) -> int:
        """Processes given out or kept: running turns (and the ones about to
        start their CLI), warm clients, spares and spares starting."""
        return self.busy + len(self.idle) + self.spare_count + self.starting

    @property
    def live(self) -> int:
        """Every CLI process this pool is answerable for: the committed ones
        and the closed ones that have not exited yet (the budget's count)."""
        return self.committed + len(self._closing)

    def counts(self) -> dict:
        return {
            "running": self.busy,
            "warm": len(self.idle),
            "spare": self.spare_count + self.starting,
            "exiting": len(self._closing),
            "budget": settings.OMNI_MAX_PROCESSES,
        }

    # --- a turn takes a process ---------------------------------------------
    def checkout(self, key: Key, *, agent: str, session_id: str | None, version: int | None,
                 fork: bool) -> Slot:
        """The process for a turn on ``key``: its warm client if it is still
        current, else a spare (new threads), else the right to start one.
        Raises :class:`ServerBusy` when every process of the budget is busy."""
        self._serving()
        warm = self.idle.pop(key, None)
        if warm is not None:
            reason, pid = None, warm.pid
            if pid is None:
                reason = "process gone"  # the CLI died (killed, crashed) while idle
            elif fork or session_id is None:
                reason = "new session"
            elif warm.agent != agent:
                reason = "agent changed"
            elif warm.session_id != session_id or warm.version != version:
                reason = "stale"  # a turn ran elsewhere since this client's last one
            if reason is None:
                self.busy += 1
                log.info("[POOL] Reusing warm client thread=%s pid=%s", key[1], pid)
                metrics.checkout("warm")
                return Slot(warm, "warm")
            self._close(warm, key[1], reason)
        if session_id is None and not fork and (spares := self.spares.get(agent)):
            spare = spares.pop(0)
            self.busy += 1
            log.info("[POOL] Using spare client agent=%s thread=%s pid=%s", agent, key[1], spare.pid)
            metrics.checkout("spare")
            return Slot(spare, "spare")
        # Refused only when every process is committed: a closed one still
        # exiting frees its place in moments (``room`` waits for it).
        if self.committed >= settings.OMNI_MAX_PROCESSES and not self._evict_one(prefer_agent=agent):
            log.warning(
                "[POOL] Refused turn thread=%s: all %d processes busy (server_busy)",
                key[1], settings.OMNI_MAX_PROCESSES,
            )
            raise ServerBusy(
                f"every Claude process of this server is busy ({settings.OMNI_MAX_PROCESSES}); try again shortly",
                retry_after=settings.OMNI_BUSY_RETRY_AFTER,
            )
        self.busy += 1
        metrics.checkout("cold", new_thread=session_id is None, fork=fork, reason=warm and reason)
        return Slot(None, "cold")

    async def room(self) -> None:
        """Before a turn starts its own CLI: wait until the processes still
        exiting (evicted for it, or closed just before) leave room for it in
        the budget, so live CLI processes never outnumber it. They exit
        within the SDK's disconnect timeout."""
        if self.live > settings.OMNI_MAX_PROCESSES:
            log.info("[POOL] Waiting for %d exiting client(s) to make room", len(self._closing))
        while self.live > settings.OMNI_MAX_PROCESSES:
            await self._exited.wait()

    def _evict_one(self, prefer_agent: str) -> bool:
        """Free one idle process for a turn: the least recently used warm
        client, else a spare (one of another agent first)."""
        if self.idle:
            key, warm = self.idle.popitem(last=False)
            self._close(warm, key[1], "budget")
            return True
        for agent in sorted(self.spares, key=lambda a: a == prefer_agent):
            if self.spares[agent]:
                self._close(self.spares[agent].pop(), None, "budget")
                return True
        return False

    # --- the turn gives it back ----------------------------------------------
    def checkin(self, slot: Slot, key: Key, warm: WarmClient, *, agent: str,
                session_id: str, version: int | None) -> None:
        """A turn ended cleanly: keep its client warm for the thread's next turn
        (unless it is due for recycling, or warm clients are off)."""
        if not self._give_back(slot):
            return
        self.fill_spares()  # replace a used spare, after its turn
        warm.agent, warm.session_id, warm.version = agent, session_id, version
        warm.turns += 1
        warm.last_used = time.monotonic()
        reason, pid = None, warm.pid
        if self.stopping or settings.OMNI_WARM_CLIENTS <= 0:
            reason = "not kept"
        elif warm.turns >= settings.OMNI_WARM_MAX_TURNS:
            reason = f"recycled after {warm.turns} turns"
        elif pid is None:
            reason = "process gone"
        elif settings.OMNI_WARM_MAX_RSS_MB and (mb := rss_mb(pid)) > settings.OMNI_WARM_MAX_RSS_MB:
            reason = f"recycled at {mb:.0f} MB RSS"
        if reason:
            self._close(warm, key[1], reason)
            return
        if (old := self.idle.pop(key, None)) is not None:  # cannot happen: one turn per thread
            self._close(old, key[1], "replaced")
        self.idle[key] = warm
        while len(self.idle) > settings.OMNI_WARM_CLIENTS:
            old_key, old = self.idle.popitem(last=False)
            self._close(old, old_key[1], "lru")
        self._start_janitor()

    def discard(self, slot: Slot, reason: str) -> None:
        """A turn ended without a client to keep (it closed its own, see
        :meth:`kill`) or never used its process: free the slot."""
        if not self._give_back(slot):
            return
        self.fill_spares()
        if (unused := slot.take()) is not None:
            self._close(unused, None, reason)

    async def close(self, client: ClaudeSDKClient, *, kill: bool = False) -> None:
        """End a client a turn cannot keep (after an error or an interrupt
        without a result). ``kill``: a hung CLI, which may never exit on its
        own: SIGKILL it first, then let the SDK reap it."""
        if kill and (pid := client_pid(client, quiet=True)) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await _disconnect(client)

    def _give_back(self, slot: Slot) -> bool:
        if slot.returned:
            return False
        slot.returned = True
        self.busy -= 1
        return True

    # --- forgetting a thread ----------------------------------------------------
    def forget(self, key: Key, reason: str = "deleted") -> None:
        """Close a thread's warm client (its thread was deleted). Safe to call
        from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._forget(key, reason)
        else:
            loop.call_soon_threadsafe(self._forget, key, reason)

    def _forget(self, key: Key, reason: str) -> None:
        if (warm := self.idle.pop(key, None)) is not None:
            self._close(warm, key[1], reason)

    # --- spares ----------------------------------------------------------------
    def fill_spares(self) -> None:
        """Start missing spares in the background, within the budget."""
        if self.stopping or settings.OMNI_SPARE_CLIENTS <= 0:
            return
        if self._filling is None or self._filling.done():
            self._serving()
            # A context of its own (not the turn's or request's that asked: a
            # spare outlives both, and its log lines name no turn).
            self._filling = asyncio.get_running_loop().create_task(self._fill(), context=contextvars.Context())

    async def _fill(self) -> None:
        from .sdk import agent_preset, build_options, session_store
        from .tools import ToolContext

        while not self.stopping and self.live < settings.OMNI_MAX_PROCESSES:
            missing = [name for name in settings.OMNI_AGENTS
                       if len(self.spares.get(name, [])) < settings.OMNI_SPARE_CLIENTS]
            if not missing:
                return
            agent, preset = agent_preset(missing[0])
            context = ToolContext()
            client = ClaudeSDKClient(build_options(preset, session_store=session_store(), context=context))
            self.starting += 1
            try:
                started = await self._start(client, agent)
            finally:
                self.starting -= 1
            if not started:
                return  # stop filling for now: the next connect or turn tries again
            spare = WarmClient(client, agent, context=context)
            if self.stopping:
                await _disconnect(client)
                return
            self.spares.setdefault(agent, []).append(spare)
            log.info("[POOL] Spare client ready agent=%s pid=%s", agent, spare.pid)

    async def _start(self, client: ClaudeSDKClient, agent: str) -> bool:
        """Connect a spare within ``OMNI_CLI_START_SECONDS``; on failure or
        timeout its CLI is killed and the client closed (False)."""
        limit = float(settings.OMNI_CLI_START_SECONDS)
        connecting = asyncio.get_running_loop().create_task(client.connect())
        try:
            done, _ = await asyncio.wait({connecting}, timeout=limit)
        except BaseException:  # the fill was cancelled (shutdown): end the start too
            await _abort(client, connecting)
            raise
        if not done:
            log.warning("[POOL] A spare client agent=%s did not start within %ss: killing its CLI "
                        "pid=%s", agent, limit, client_pid(client, quiet=True))
            await _abort(client, connecting)
            return False
        if (error := connecting.exception()) is not None:
            log.warning("[POOL] Could not start a spare client agent=%s", agent, exc_info=error)
            await _disconnect(client)
            return False
        return True

    # --- idle expiry -------------------------------------------------------------
    def _start_janitor(self) -> None:
        if self._janitor is None or self._janitor.done():
            # A context of its own: not the turn's (or request's) that checked in.
            self._janitor = asyncio.get_running_loop().create_task(
                self._expire_idle(), context=contextvars.Context())

    async def _expire_idle(self) -> None:
        """While idle warm clients exist: close the ones idle for
        ``OMNI_WARM_IDLE_SECONDS``, and the ones whose thread is gone (deleted
        by another server process, ``prune_sessions`` or behind the pool's
        back: the delete signal reaches only the deleting process)."""
        while self.idle and not self.stopping:
            tick = min(settings.OMNI_WARM_IDLE_SECONDS / 4, 30, MAPPING_CHECK_SECONDS)
            await asyncio.sleep(max(0.05, tick))
            now = time.monotonic()
            for key, warm in list(self.idle.items()):
                if now - warm.last_used >= settings.OMNI_WARM_IDLE_SECONDS:
                    del self.idle[key]
                    self._close(warm, key[1], "idle")
            await self._close_deleted()

    async def _close_deleted(self) -> None:
        """Close the idle warm clients whose thread has no mapping any more,
        or one of another session (deleted and started anew): one query for
        all of them, on the ORM's thread."""
        asked = dict(self.idle)
        if not asked:
            return
        since = time.monotonic()
        try:
            sessions = await sync_to_async(_current_sessions)(list(asked))
        except Exception:
            log.warning("[POOL] Could not check the idle clients' threads", exc_info=True)
            return
        for key, warm in asked.items():
            # Taken by a turn (or checked in anew) meanwhile: its turn saved
            # its mapping after this query began; leave it to the next tick.
            if self.idle.get(key) is not warm or warm.last_used > since:
                continue
            if sessions.get(key) != warm.session_id:
                del self.idle[key]
                self._close(warm, key[1], "thread deleted")

    # --- closing ------------------------------------------------------------------
    def _close(self, warm: WarmClient, thread_id: str | None, reason: str) -> None:
        log.info("[POOL] Closing client thread=%s pid=%s: %s", thread_id or "-", warm.pid, reason)
        metrics.evicted(reason)
        task = asyncio.get_running_loop().create_task(
            _retire(warm, erase=reason in ERASING_REASONS), context=contextvars.Context())
        self._closing.add(task)
        self._closing_clients[task] = warm
        task.add_done_callback(self._on_exit)

    def _on_exit(self, task: asyncio.Task) -> None:
        self._closing.discard(task)
        self._closing_clients.pop(task, None)
        self._exited.set()  # wake the turns waiting for room ...
        self._exited = asyncio.Event()  # ... and the next exit wakes the next

    # --- serving -------------------------------------------------------------------
    def start(self) -> None:
        """Serve on the running event loop: once, when the server starts
        (:func:`chat_app.lifecycle.startup`), and again only after a
        :meth:`shutdown`. Clients of an earlier loop that was never shut down
        cannot be disconnected any more: their CLIs are killed."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and not self.stopping:
            return
        leftovers = [*self.idle.values(), *(s for spares in self.spares.values() for s in spares),
                     *self._closing_clients.values()]
        if leftovers:
            log.warning("[POOL] Started again: killing %d clients of the last loop", len(leftovers))
        for warm in leftovers:
            if (pid := warm.pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _forget_pid(warm.client)
        self.idle.clear()
        self.spares.clear()
        self._closing.clear()
        self._closing_clients.clear()
        self.busy = self.starting = 0
        self._exited = asyncio.Event()
        self._filling = self._janitor = None
        self.stopping = False
        self._loop = loop

    def _serving(self) -> None:
        """The pool lives on the loop it was started on (the server's)."""
        if self._loop is not asyncio.get_running_loop():
            raise RuntimeError("the process pool serves another event loop (or was never started: "
                               "chat_app.lifecycle.startup() starts it with the server)")

    async def shutdown(self) -> None:
        """Close every idle client and spare and wait for their CLIs to exit
        (running turns are the registry's to stop first)."""
        self.stopping = True
        # A spare being started finishes its start (its connect sets up the
        # CLI and the tools' MCP session: cut short, their tasks can outlive
        # the loop) and is closed by the filler itself; only a start that
        # hangs is cancelled.
        if self._filling is not None and not self._filling.done():
            await asyncio.wait({self._filling}, timeout=float(settings.OMNI_CLI_START_SECONDS))
        for task in (self._filling, self._janitor):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for key, warm in list(self.idle.items()):
            self._close(warm, key[1], "shutdown")
        self.idle.clear()
        for spares in self.spares.values():
            for spare in spares:
                self._close(spare, None, "shutdown")
        self.spares.clear()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=10)


def _current_sessions(keys: list[Key]) -> dict[Key, str]:
    """``(resource_id, thread_id) -> session_id`` of the threads of ``keys``
    that still exist."""
    from django.db import close_old_connections

    from sessions_app.selectors import current_sessions_sync

    close_old_connections()  # as a request does: a broken or too old connection goes
    return current_sessions_sync(keys)


# A client closed for these reasons held a deleted conversation: its CLI's
# local files are erased, not only dropped once stored.
ERASING_REASONS = frozenset({"thread deleted", "deleted"})


async def _retire(warm: WarmClient, *, erase: bool = False) -> None:
    """Close a warm client and, with the transcript store on, remove its CLI's
    local copy of the conversation (a cache of what the database holds; a warm
    client's turns keep it while the client lives)."""
    await _disconnect(warm.client)
    if warm.session_id is None or not settings.OMNI_SESSION_STORE:
        return
    from asgiref.sync import sync_to_async

    from sessions_app import services

    drop = services.erase_local_transcript if erase else services.drop_mirrored_local_transcript
    try:
        await sync_to_async(drop)(warm.session_id)
    except Exception:
        log.warning("[POOL] Could not remove the local transcript of %s", warm.session_id, exc_info=True)


EXIT_GRACE_SECONDS = 2.0  # after a disconnect, the CLI has this long to exit before a SIGKILL


async def _disconnect(client: ClaudeSDKClient) -> None:
    """Close a client; its CLI is gone afterwards (a CLI still running a
    moment after the SDK's disconnect is killed: a closed client must not
    leave a process behind)."""
    pid = client_pid(client, quiet=True)
    started = (process_state(pid) or (None, None))[1] if pid is not None else None
    try:
        await client.disconnect()
    except Exception:
        log.debug("disconnect failed", exc_info=True)
    finally:
        _forget_pid(client)
    if pid is None or started is None:
        return
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    # the same process (its start time), still running
    while (state := process_state(pid)) is not None and state[1] == started and state[0] not in ("Z", "X"):
        if time.monotonic() > deadline:
            log.warning("[POOL] A closed client's CLI pid=%s still ran: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.02)


async def _abort(client: ClaudeSDKClient, connecting: asyncio.Task) -> None:
    """End a client whose ``connect()`` is still running: SIGKILL its CLI (if
    it has started one), cancel the connect (the SDK then closes what it
    opened) and close the client."""
    if (pid := client_pid(client, quiet=True)) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    connecting.cancel()
    try:
        await asyncio.wait({connecting}, timeout=10)
        if connecting.done() and not connecting.cancelled():
            connecting.exception()  # retrieved: it is the timeout's doing
    finally:
        await _disconnect(client)


pool = ProcessPool()
