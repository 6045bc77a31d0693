"""A worker's background loops (the sweeps of decided tool calls, of busy
threads' queues, of orphaned uploads): each one task on the server's event
loop, started once per loop by ``chat_app.lifecycle.startup`` and cancelled
at shutdown, in a context of its own (not that of whoever started the server).
In the bottom layer (like :mod:`sessions_app.outages`): every app may use it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Awaitable, Callable


class Background:
    """``run()`` (a coroutine function that loops) as this loop's one task."""

    def __init__(self, run: Callable[[], Awaitable[None]]):
        self._run = run
        self.task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        """Its task runs on the current event loop."""
        task = self.task
        return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()

    def start(self) -> bool:
        """Start it unless it runs on this loop already; True if started."""
        if self.running:
            return False
        self.task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        return True

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
