"""``GET /api/health`` (contract §4): is this worker fit to take traffic?

Cheap enough for a load balancer to poll every second, and bounded when a
dependency is down: one ``SELECT 1`` and one Redis ``PING``, each given about
a second. No credentials, no data: the checks' names and ``ok``/``off``/
``error``, and this process's live CLI counts.

The database must take a *write*, not only answer a read (issue 22, item 5:
a full disk had turns failing while health said ``ok``). Two things detect
it, because neither alone does:

* a committed write: the upsert of one row (``sql.health_beat``), at most
  every ``WRITE_SECONDS`` while it succeeds and at every probe once it
  failed. It fails on a read-only file, mount or server (a standby after a
  failover, ``default_transaction_read_only``) and when the write needs
  space that is not there. It leaves nothing behind (always the same row)
  and waits at most ``LOCK_WAIT_MS`` for SQLite's write lock: a lock held
  by a turn means the file takes writes, so a busy lock is not a failure.
* the free space of the embedded file's filesystem (``statvfs``, every
  probe): on a full disk SQLite still commits small writes into the WAL's
  space already allocated after a checkpoint (so the probe's write can
  pass) while the turns' bigger writes fail. Under ``MIN_FREE_BYTES`` is a
  failure. PostgreSQL's disk is the server's to watch (its full WAL disk
  fails the commit above).

A check never piles up (issue 14, item 6). Each is *single-flight*: at most
one probe of it runs at a time, and health requests that come meanwhile
await that same probe (each for at most ``CHECK_SECONDS``) instead of
starting their own; a result younger than ``FRESH_SECONDS`` is answered
again without a probe. The database probe is blocking ORM work: it runs on
a daemon thread of its own, never on the default executor that static files
and other sync work share, and its connection attempt is bounded by
PostgreSQL's ``connect_timeout`` (``omni/db/urls.py``). A probe that still
hangs past ``STALE_SECONDS`` (a connection black-holed mid-query) is given
up: a new one may start, with at most ``MAX_ABANDONED`` such threads left
behind, so a balancer polling every second during an outage costs at most a
few threads, however long the outage lasts.

A failing check is logged when it starts failing and when it passes again,
not at every probe: a balancer polling every second through an outage adds
two lines to the log, not one a second (``Transitions``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
import time
from pathlib import Path

from django.db import OperationalError, connections
from django.http import JsonResponse
from django.utils import timezone
from ninja import Router, Schema

from sessions_app import sql

from chat_app import streams
from chat_app.turns import process_counts

log = logging.getLogger("omni.api")
router = Router(tags=["health"])
CHECK_SECONDS = 1.0  # how long one health request waits for a check
FRESH_SECONDS = 1.0  # a check's result is reused this long
STALE_SECONDS = 15.0  # a database probe running longer is given up (connect_timeout is 3 s)
MAX_ABANDONED = 2  # given-up probe threads that may still be alive
WRITE_SECONDS = 10.0  # a successful write probe is repeated this long after
LOCK_WAIT_MS = 500  # how long the write probe waits for SQLite's write lock
MIN_FREE_BYTES = 1 << 20  # less free space for the embedded file: the database is full


class HealthChecks(Schema):
    database: str
    channelLayer: str
    turns: str


class HealthOut(Schema):
    status: str
    checks: HealthChecks
    processes: dict[str, int | bool]


_last_write = 0.0  # monotonic time of the last write probe that committed; 0: due


def _free_space(connection) -> None:
    """Raise ``OSError(ENOSPC)`` when the embedded file's filesystem has less
    than ``MIN_FREE_BYTES`` for it (the root's reserve counts for a root
    server, as its writes may use it). Other engines: nothing to look at."""
    if connection.vendor != "sqlite" or getattr(connection, "is_remote", False):
        return
    stat = os.statvfs(Path(connection.settings_dict["NAME"]).parent)
    free = (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize
    if free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"{free} bytes free for the database file")


def _write() -> None:
    """The committed write, when due (see the module's docstring)."""
    global _last_write
    if time.monotonic() - _last_write < WRITE_SECONDS:
        return
    try:
        sql.health_beat(now=timezone.now(), lock_wait_ms=LOCK_WAIT_MS)
    except OperationalError as exc:
        if "database is locked" in str(exc):
            return  # a turn writes: the file takes writes (still due: probed again next time)
        raise
    _last_write = time.monotonic()


def _database() -> str:
    # A connection of the probe's own thread, closed after: each probe tests
    # reachability (and holds no connection between polls).
    connection = connections["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        _free_space(connection)
        _write()
    finally:
        connection.close()
    return "ok"


class Transitions:
    """Logs a check's changes: its first failure (an error line) and its
    first success after failures (a warning line)."""

    def __init__(self, name: str):
        self.name = name
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            self.failing = True
            log.error("health: %s check failed: %s", self.name, exc or type(exc).__name__)

    def passed(self) -> None:
        if self.failing:
            self.failing = False
            log.warning("health: %s check passes again", self.name)


class ThreadProbe:
    """A blocking check run single-flight on a daemon thread of its own.

    Its result is a ``concurrent.futures.Future`` shared by every waiter (of
    any event loop); daemon threads, so a hung probe never holds up the
    process's exit."""

    def __init__(self, name: str, check):
        self.name = name
        self.check = check
        self._lock = threading.Lock()
        self._current: concurrent.futures.Future | None = None
        self._started = 0.0
        self._abandoned: list[concurrent.futures.Future] = []
        self.transitions = Transitions(name)

    def future(self) -> concurrent.futures.Future:
        """The probe in flight, a fresh enough finished one, or a new one."""
        with self._lock:
            now = time.monotonic()
            current = self._current
            if current is not None:
                if not current.done():
                    if now - self._started < STALE_SECONDS:
                        return current
                    self._abandoned = [f for f in self._abandoned if not f.done()]
                    if len(self._abandoned) >= MAX_ABANDONED:
                        return current  # no more threads: wait for the hung ones
                    log.error("health: the %s probe hung for %.0f s; starting another",
                              self.name, now - self._started)
                    self._abandoned.append(current)
                elif now - getattr(current, "finished_at", now) < FRESH_SECONDS:
                    return current
            self._current = future = concurrent.futures.Future()
            self._started = now
            threading.Thread(target=self._run, args=(future,), daemon=True,
                             name=f"omni-health-{self.name}").start()
            return future

    def _run(self, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = self.check()
        except BaseException as exc:
            self.transitions.failed(exc)
            future.finished_at = time.monotonic()
            future.set_exception(exc)
        else:
            self.transitions.passed()
            future.finished_at = time.monotonic()
            future.set_result(result)

    def threads(self) -> int:
        """Probe threads alive (the one in flight and given-up ones)."""
        with self._lock:
            return sum(not f.done() for f in [*self._abandoned, self._current] if f is not None)

    async def result(self, timeout: float) -> str:
        future = self.future()
        if not future.done():
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_):
                try:
                    loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))
                except RuntimeError:  # that loop closed meanwhile
                    pass

            future.add_done_callback(wake)
            async with asyncio.timeout(timeout):
                await waiter
        return future.result()


class LoopProbe:
    """An async check run single-flight on the event loop, bounded by ``CHECK_SECONDS``
    of its own (waiting for it cannot take longer)."""

    def __init__(self, name: str, check):
        self.name = name
        self.check = check
        self._task: asyncio.Task | None = None
        self._finished = 0.0
        self.transitions = Transitions(name)

    async def _run(self) -> str:
        try:
            async with asyncio.timeout(CHECK_SECONDS):
                result = await self.check()
        except Exception as exc:
            self.transitions.failed(exc)
            return "error"
        finally:
            self._finished = time.monotonic()
        self.transitions.passed()
        return result

    async def result(self) -> str:
        loop = asyncio.get_running_loop()
        task = self._task
        reuse = task is not None and task.get_loop() is loop and (
            not task.done() or time.monotonic() - self._finished < FRESH_SECONDS)
        if not reuse:
            task = self._task = loop.create_task(self._run(), name=f"omni-health-{self.name}")
        # shielded: a waiter that goes away does not cancel the others' probe
        return await asyncio.shield(task)


async def _channel_layer() -> str:
    if streams.layer() is None or not streams.distributed():
        return "off"  # the in-memory layer: one process, nothing to reach
    await streams.ping()
    return "ok"


database_probe = ThreadProbe("database", _database)
channel_layer_probe = LoopProbe("channelLayer", _channel_layer)


async def check_database() -> str:
    try:
        return await database_probe.result(CHECK_SECONDS)
    except Exception:  # failed (logged by the probe) or still running after CHECK_SECONDS
        return "error"


async def check_channel_layer() -> str:
    return await channel_layer_probe.result()


@router.get("/health", auth=None, response={200: HealthOut, 503: HealthOut},
            summary="Health of this server process")
async def health(request):
    """`status` is `ok` when every check is `ok` (or `off`: no channel layer to reach); otherwise
    the answer is 503 and the failing check says `error` (`database` fails when the database
    cannot take a write, too: read-only, or out of space; `turns` says `draining` while the
    process is shutting down and takes no new turns). `processes` counts this process's
    live Claude CLI processes: `running` (turns in progress), `warm` (idle warm clients),
    `spare` (started for new threads) and `budget`, their limit. A check's result may be up
    to a second old: concurrent requests share one probe of each dependency."""
    database, layer = await asyncio.gather(check_database(), check_channel_layer())
    counts = process_counts()
    # A worker that is stopping (SIGTERM) takes no new turns: the balancer
    # should send them elsewhere.
    turns = "draining" if counts.get("draining") else "ok"
    checks = {"database": database, "channelLayer": layer, "turns": turns}
    ok = all(value in ("ok", "off") for value in checks.values())
    body = {"status": "ok" if ok else "error", "checks": checks, "processes": counts}
    return JsonResponse(body, status=200 if ok else 503)
