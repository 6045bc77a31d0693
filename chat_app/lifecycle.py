"""The server's start and its shutdown order: the one place the pool, the
registry, the stream hub, the approvals' sweeper, the sweep of busy threads'
queues and the sweep of orphaned attachments are started and stopped.

At start (:func:`startup`, when daphne's reactor runs) this worker takes
turns, its process pool serves on the server's event loop and starts its
spares, and its sweeper starts. The registry's hooks for the hub are set when
the app loads (``chat_app.apps``).

On SIGTERM daphne's reactor stops; before it stops listening, this worker:

1. takes no new turns (``503 server_busy``; ``/api/health`` says ``draining``);
2. lets running turns finish for ``OMNI_SHUTDOWN_GRACE_SECONDS``, then
   interrupts the rest and waits for them (their mappings are saved and
   their leases released, so their threads resume on any worker);
3. closes every warm client and spare and waits for their CLIs to exit;
4. stops the streams hub.

Without this a turn's task never finishes, its CLI outlives the loop and the
SDK's anyio worker thread (non-daemon) keeps the process from exiting. The
hook is installed when the ASGI application loads (``omni/asgi.py``), so a
worker that served pages and started spares but never ran a turn stops its
spares too.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from sessions_app.attachments import sweeper as attachment_sweeper

from . import queue
from .approvals import start_sweeper, stop_sweeper
from .pool import pool
from .streams import hub
from .turns import registry

log = logging.getLogger("omni.chat")

_installed = False


async def startup() -> None:
    """The server's event loop runs: serve turns on it."""
    registry.draining = False
    pool.start()
    pool.fill_spares()  # a process ready for the first new thread
    start_sweeper()
    queue.start_sweeper()  # queues whose worker died go on here
    attachment_sweeper.start()  # uploads never sent, deleted after OMNI_ATTACHMENT_ORPHAN_HOURS
    await hub.start()  # on the channel layer: deletes, followers and interrupts from other workers


async def shutdown(grace: float | None = None) -> None:
    try:
        await stop_sweeper()  # decided calls wait for another worker (or this one's restart)
        await queue.stop_sweeper()  # queued messages wait for another worker's sweep
        await attachment_sweeper.stop()
        await registry.shutdown(grace)
    finally:
        try:
            await pool.shutdown()  # every warm client and spare: no CLI outlives the worker
        finally:
            await hub.stop()


def install() -> bool:
    """Under daphne (a Twisted reactor), run :func:`startup` once the reactor
    runs and :func:`shutdown` when it is asked to stop. Never installs a reactor itself: outside
    daphne (tests, management commands) it does nothing. True if installed."""
    global _installed
    if _installed or "twisted.internet.reactor" not in sys.modules:
        return _installed
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    reactor.callWhenRunning(lambda: asyncio.ensure_future(startup()))
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromFuture(asyncio.ensure_future(shutdown())))
    _installed = True
    return True
