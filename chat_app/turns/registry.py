"""The turns of this process: the one-turn-per-thread lock of this process,
the running turn of each thread, and each finished turn for
``OMNI_STREAM_LINGER_SECONDS`` (so a client that reconnects right after the
end still gets the tail, by its ``turnId``).

Across processes the thread's lease (:mod:`chat_app.leases`) is the lock;
the registry only knows this process's turns. Other modules hook in without
the registry importing them: ``started`` hooks run in a turn's task before
it runs (the streams hub answers for it on the channel layer), ``freed``
hooks once it freed its thread (the thread's queue goes on), ``forgotten``
hooks when its linger ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Awaitable, Callable

from django.conf import settings

from ..pool import pool
from .runner import Turn

log = logging.getLogger("omni.chat")

Key = tuple[str, str]


class TurnRegistry:
    def __init__(self):
        self._running: dict[Key, Turn] = {}
        self._by_id: dict[str, Turn] = {}  # running and lingering, by turn id
        self.draining = False  # the server is stopping: no new turns
        self.started: list[Callable[[Turn], Awaitable[None]]] = []
        self.forgotten: list[Callable[[Turn], None]] = []
        # Run once a turn freed its thread here (process back, lease let go),
        # before its last event: the thread's queue starts its next message.
        self.freed: list[Callable[[Turn], None]] = []

    # --- lookups ----------------------------------------------------------------
    def get(self, resource_id: str, thread_id: str) -> Turn | None:
        """The thread's running turn in this process."""
        return self._running.get((resource_id, thread_id))

    def by_id(self, turn_id: str) -> Turn | None:
        """A turn of this process by its id: running, or ended moments ago."""
        return self._by_id.get(turn_id)

    def running(self) -> list[Turn]:
        return list(self._running.values())

    def count(self, resource_id: str) -> int:
        return sum(key[0] == resource_id for key in self._running)

    # --- starting -----------------------------------------------------------------
    def start(self, turn: Turn) -> Turn:
        """Run an admitted turn (:mod:`.admission`, the only caller) in a task
        of its own. The thread is this process's turn from here until the
        turn frees it (``on_free``), just before its last event."""
        self._running[turn.spec.key] = turn
        self._by_id[turn.turn_id] = turn
        # A context of its own: the turn outlives the request that started
        # it, so it must not use that request's thread-sensitive executor.
        loop = asyncio.get_running_loop()
        turn.task = loop.create_task(self._run(turn), context=contextvars.Context())
        turn.task.add_done_callback(lambda _: self._task_done(turn))
        return turn

    async def _run(self, turn: Turn) -> None:
        for hook in self.started:
            await hook(turn)
        await turn.run(on_free=self._release)

    def _task_done(self, turn: Turn) -> None:
        """The turn's task ended. One cancelled before its first step never
        ran the turn's own cleanup: the turn gives its process back and ends
        its stream (a no-op for a turn that ran), the thread is freed here."""
        turn.abandon()
        self._release(turn)

    def _release(self, turn: Turn) -> None:
        key = turn.spec.key
        if self._running.get(key) is not turn:
            return
        del self._running[key]
        for hook in self.freed:
            try:
                hook(turn)
            except Exception:
                log.warning("a freed-turn hook failed", exc_info=True)
        linger = float(settings.OMNI_STREAM_LINGER_SECONDS)
        try:
            asyncio.get_running_loop().call_later(linger, self._forget, turn)
        except RuntimeError:  # no loop: nothing lingers
            self._forget(turn)

    def _forget(self, turn: Turn) -> None:
        if self._by_id.get(turn.turn_id) is turn and self._running.get(turn.spec.key) is not turn:
            del self._by_id[turn.turn_id]
            for hook in self.forgotten:
                try:
                    hook(turn)
                except Exception:
                    log.warning("a forgotten-turn hook failed", exc_info=True)

    # --- stopping -------------------------------------------------------------------
    async def abort(self, key: Key, code: str, message: str) -> bool:
        """Stop the thread's running turn here for good (see :meth:`Turn.abort`)."""
        turn = self._running.get(key)
        if turn is None:
            return False
        await turn.abort(code, message)
        return True

    async def shutdown(self, grace: float | None = None, timeout: float = 5) -> None:
        """Take no new turns (503 ``server_busy``), let the running ones
        finish for up to ``grace`` seconds (``OMNI_SHUTDOWN_GRACE_SECONDS``),
        then interrupt the rest and wait for them to end (their CLI exits,
        their mapping is saved and their lease released, so they resume on
        any worker)."""
        self.draining = True
        pool.stopping = True  # turns ending now keep no warm client
        grace = settings.OMNI_SHUTDOWN_GRACE_SECONDS if grace is None else grace
        for turn in self.running():
            if turn.waiting:  # a person may take minutes: let go now, the call waits on
                turn.detach()
        turns = self.running()
        if not turns:
            return
        tasks = [turn.task for turn in turns if turn.task is not None]
        log.info("[CHAT] Server stopping: waiting up to %ss for %d running turn(s)", grace, len(turns))
        if grace > 0:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        else:
            pending = set(tasks)
        if not pending:
            return
        log.info("[CHAT] Server stopping: interrupting %d running turn(s)", len(pending))
        for turn in turns:
            if turn.task in pending:
                if turn.waiting:
                    turn.detach()
                else:
                    await turn.interrupt()
        _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)


registry = TurnRegistry()


def process_counts() -> dict:
    """This process's live Claude CLI processes, for ``GET /api/health``:
    ``running`` (turns in progress), ``warm`` (idle warm clients), ``spare``
    (started for new threads), ``exiting`` (closed, not yet exited),
    ``budget`` (their limit), and ``draining``."""
    return {**pool.counts(), "draining": registry.draining}
