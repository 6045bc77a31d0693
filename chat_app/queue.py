"""A message for a busy thread (contract §12): reject, enqueue, interrupt.

A chat request or frame with ``ifBusy`` ``enqueue`` or ``interrupt`` is
admitted like any message (:func:`submit`); when the thread is busy (a turn
runs on it on any worker, a tool call of it waits, or messages already wait
in its queue) the message becomes a row of the thread's queue
(:class:`chat_app.models.QueuedMessage`, :mod:`chat_app.turns.queued`) and the
caller gets a :class:`QueuedStream` at once. ``interrupt`` also stops the
running turn (as Stop does) and its row goes before every ``enqueue`` one.

Who starts a queued message's turn:

* **the worker that frees the thread**: a turn that ends (registry ``freed``
  hook, once its process is back and its lease let go, before its ``done``
  is published) kicks its thread's queue (:func:`kick`): the head's turn is
  admitted on this worker, on the thread's warm client;
* **the one that queued it**: right after queueing (the running turn may
  have ended meanwhile);
* **the sweep** (every :data:`SWEEP_SECONDS` on every worker): a queue
  whose thread no live lease holds (the worker that would have kicked it
  died) is kicked by whichever worker sweeps first.

Every kick goes through the one admission path (:mod:`chat_app.turns.admission`,
kind ``QUEUED``): under the thread's lease the row must be the thread's head,
then the message's checks, the budget and the limits; a refusal there
(over the budget, a limit, an attachment gone) is the row's outcome and its
stream's ``error``, and the queue goes on with the next. A busy thread or a
full server (``thread_busy``, ``server_busy``) leaves the row waiting.

The turn of a row carries the row's ``turnId`` (given when it was queued);
an ``enqueue`` turn's first event (seq 0) is the ``queued`` event its stream
opened with, so its stream, a follow of the thread and a ``Last-Event-ID``
all count the same way. A row whose worker died before the message was
stored (``starting``) runs again, under the same ``turnId``.

A :class:`QueuedStream` waits on any worker: it reads its row when woken (a
turn started on the thread here, or a ``omni.queue``/``omni.started``
message on the thread's group from another worker, see
:class:`chat_app.streams.ThreadWatch`) and at least every
:func:`chat_app.streams.idle_seconds`; once the row's turn started it
follows that turn wherever it runs (:func:`chat_app.streams.follow`), through
``done``. A cancelled row ends it with ``error`` ``cancelled``, a refused one
with the refusal, a deleted thread with ``thread_deleted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from typing import AsyncIterator

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.utils import timezone

from sessions_app.background import Background
from sessions_app import selectors
from sessions_app.errors import ApiError, Conflict, NotFound

from . import events, leases, metrics, streams
from .models import QueuedMessage
from .sdk import agent_preset
from .turns import TurnSpec, registry
from .turns import admission, queued
from .turns.runner import Turn

log = logging.getLogger("omni.chat")

SWEEP_SECONDS = 2.0  # a queue whose worker died is picked up within this (after its lease lapsed)
KEEP_ENDED_SECONDS = 600.0  # an ended row is kept this long: its streams learn the outcome
RETRY_LATER = frozenset({"thread_busy", "server_busy", "unavailable"})  # the row waits on
# A started row's turn not found this many times over: it ended long ago.
FOLLOW_TRIES = 4


# --- queueing ---------------------------------------------------------------------------

async def submit(spec: TurnSpec, mode: str, user) -> Turn | QueuedStream:
    """A message with ``ifBusy`` ``mode`` (``enqueue`` or ``interrupt``): its
    turn if the thread is free, else its place in the thread's queue."""
    try:
        return await admission.admit(spec, admission.MESSAGE_OR_QUEUE)
    except Conflict as exc:
        if exc.code != "thread_busy":
            raise
    who = user.get_username() if getattr(user, "is_authenticated", False) else ""
    try:
        row = await sync_to_async(_enqueue_sync)(spec, mode, who)
    except ApiError as exc:
        metrics.refused(exc.code)
        raise
    log.info("[CHAT] Queued message %s on thread %s (%s, position %d)",
             row.queue_id, spec.thread_id, mode, row.position)
    stream = QueuedStream.of(row)
    if mode == QueuedMessage.INTERRUPT:
        await _interrupt(spec.resource_id, spec.thread_id)
    await notify(spec.key)  # the page's queue on other sockets; a sweep on other workers
    _spawn(kick(spec.resource_id, spec.thread_id))  # the running turn may have ended meanwhile
    return stream


def _enqueue_sync(spec: TurnSpec, mode: str, who: str) -> QueuedMessage:
    admission.attachments_sync(spec)  # 404 / 413 now, not when it runs
    return queued.insert_sync(spec, mode, who)


async def _interrupt(resource_id: str, thread_id: str) -> None:
    """Stop the thread's running turn (wherever it runs); its end starts the
    interrupting message. No turn (it just ended) or an unreachable worker:
    the queue goes on when the thread is free."""
    try:
        await streams.interrupt(resource_id, thread_id)
    except ApiError as exc:
        log.info("[CHAT] Interrupt for a queued message on thread %s: %s", thread_id, exc.code)


async def cancel(resource_id: str, thread_id: str, queue_id: str) -> dict:
    """Cancel a waiting message: its stream ends with ``error`` ``cancelled``.
    404 once its turn started, or for another resource's or an unknown id."""
    if not await sync_to_async(queued.cancel_sync)(resource_id, thread_id, queue_id):
        raise NotFound(f"no queued message {queue_id!r} waits on thread {thread_id!r}")
    log.info("[CHAT] Cancelled queued message %s on thread %s", queue_id, thread_id)
    await notify((resource_id, thread_id))
    return {"success": True, "queueId": queue_id}


async def listing(resource_id: str, thread_id: str) -> dict:
    """``GET /api/chat/queue``: the thread's waiting messages, in order
    (404: the resource has no such thread, nor a queue for it)."""
    rows = await sync_to_async(_listing_sync)(resource_id, thread_id)
    return {"queued": [{"queueId": row.queue_id, "message": row.message, "position": n,
                        "createdAt": row.created_at.isoformat()} for n, row in enumerate(rows, 1)]}


def _listing_sync(resource_id: str, thread_id: str) -> list[QueuedMessage]:
    rows = queued.waiting_sync(resource_id, thread_id)
    if not rows and selectors.turn_mapping_sync(thread_id, resource_id) is None \
            and leases.active_sync(resource_id, thread_id) is None:
        raise NotFound(f"no thread {thread_id!r}")
    return rows


def stream_of(started: Turn | QueuedStream) -> streams.Stream:
    """What :func:`chat_app.turns.start_turn` gave, as a stream for a transport."""
    return started if isinstance(started, streams.Stream) else streams.Stream.of(started)


async def notify(key: tuple[str, str]) -> None:
    """The thread's queue changed: wake its waiting streams, here and on
    every worker (the thread's group)."""
    await streams.wake_thread(key)


# --- starting the next message -------------------------------------------------------------

_background: set[asyncio.Task] = set()


def _spawn(coro) -> None:
    task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
    _background.add(task)
    task.add_done_callback(_background.discard)


def turn_freed(turn: Turn) -> None:
    """Registry ``freed`` hook: the thread is free here; its queue goes on.
    A turn whose last save let the lease go read then whether messages wait
    (:attr:`chat_app.leases.Lease.queue_waiting`, in the same statement): no
    query after a turn of a thread with no queue. A message queued after
    that read is started by its own sender's kick (the thread was free by
    then)."""
    if registry.draining:
        return  # another worker's sweep starts it (this one stops)
    if turn.lease is not None and turn.lease.queue_waiting is False:
        return
    _spawn(kick(*turn.spec.key))


async def kick(resource_id: str, thread_id: str) -> Turn | None:
    """Start the thread's next queued message on this worker, if the thread
    is free: admitted like any turn (kind ``QUEUED``). A refusal is the
    row's outcome and the next one is tried; a busy thread or server leaves
    it for the next kick. The turn started, or None."""
    key = (resource_id, thread_id)
    while not registry.draining and registry.get(*key) is None:
        try:
            head = await sync_to_async(queued.head_sync)(resource_id, thread_id)
        except DatabaseError:
            log.warning("[CHAT] Could not read the queue of thread %s", thread_id, exc_info=True)
            return None
        if head is None:
            return None
        try:
            spec = spec_of(head)
            turn = await admission.admit(spec, admission.QUEUED)
        except ApiError as exc:
            if exc.code in RETRY_LATER:
                return None
            await _refused(head, exc)
            continue
        except DatabaseError:
            log.warning("[CHAT] Could not start the queued message %s", head.queue_id, exc_info=True)
            return None
        metrics.queue_waited((timezone.now() - head.created_at).total_seconds())
        log.info("[CHAT] Starting queued message %s on thread %s (turn %s)",
                 head.queue_id, thread_id, turn.turn_id)
        return turn
    return None


async def _refused(head: QueuedMessage, exc: ApiError) -> None:
    log.info("[CHAT] Queued message %s on thread %s refused: %s", head.queue_id, head.thread_id, exc.code)
    with contextlib.suppress(DatabaseError):
        await sync_to_async(queued.mark_failed_sync)(head.queue_id, exc.code, exc.message)
    await notify((head.resource_id, head.thread_id))


def spec_of(row: QueuedMessage) -> TurnSpec:
    """The turn of a queued row (its agent as the request named it, else the thread's)."""
    agent, preset = agent_preset(row.agent or None)
    return TurnSpec(
        row.resource_id, row.thread_id, row.message, agent, preset, turn_id=row.turn_id,
        chunks=row.chunks, agent_given=bool(row.agent), attachment_ids=list(row.attachment_ids),
        queue_id=row.queue_id,
        queued_event=queued_event(row) if row.mode == QueuedMessage.ENQUEUE else None)


def queued_event(row: QueuedMessage) -> dict:
    return {"type": "queued", "queueId": row.queue_id, "position": row.position}


# --- the sweep ---------------------------------------------------------------------------------

async def _sweep_forever() -> None:
    pruned_at = 0.0
    while True:
        try:
            await sweep_and_count()
            if time.monotonic() - pruned_at > KEEP_ENDED_SECONDS / 10:
                pruned_at = time.monotonic()
                await sync_to_async(queued.prune_ended_sync)(KEEP_ENDED_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("queue: a sweep failed", exc_info=True)
        await asyncio.sleep(SWEEP_SECONDS)


_sweeper = Background(_sweep_forever)
start_sweeper = _sweeper.start  # this worker's sweep of queues nobody starts (chat_app.lifecycle)
stop_sweeper = _sweeper.stop


async def sweep_and_count() -> list[Turn]:
    """One round of the sweep (:func:`sweep`), then ``omni_queue_depth``
    from the database: the messages still waiting on every thread."""
    started = await sweep()
    metrics.queue_depth(await sync_to_async(queued.depth_sync)())
    return started


async def sweep() -> list[Turn]:
    """Kick every queue whose thread no live turn holds (its worker died, or
    its end's kick was refused for a moment). The turns it started."""
    if registry.draining:
        return []
    started = []
    for key in await sync_to_async(queued.orphaned_threads_sync)():
        if registry.get(*key) is None and (turn := await kick(*key)) is not None:
            started.append(turn)
    return started


# --- the stream of a queued message -------------------------------------------------------------

class QueuedStream(streams.WaitingStream):
    """A queued message's events: ``queued`` (``enqueue`` only), then its
    turn's, wherever and whenever it runs (see the module doc)."""

    @classmethod
    def of(cls, row: QueuedMessage, after: int = -1) -> "QueuedStream":
        """Its events after seq ``after`` (a client reconnecting with the
        SSE id of the ``queued`` event gets the rest)."""
        stream = cls(row.turn_id, None, row.thread_id)
        stream.resource_id = row.resource_id
        stream.events = _queued_events(stream, row, after)
        return stream


async def follow(resource_id: str, thread_id: str, *, turn_id: str | None = None,
                 after: int | None = None, exclude=()) -> streams.Stream | None:
    """:func:`chat_app.streams.follow`, and also a queued message's turn
    that has not started yet, by the ``turnId`` its ``queued`` event named
    (``Last-Event-ID``, a websocket ``follow`` with ``turnId``)."""
    try:
        return await streams.follow(resource_id, thread_id, turn_id=turn_id, after=after, exclude=exclude)
    except NotFound:
        if turn_id is None:
            raise
        row = await sync_to_async(queued.by_turn_sync)(resource_id, thread_id, turn_id)
        if row is None or row.state != QueuedMessage.WAITING:
            raise
        return None if turn_id in exclude else QueuedStream.of(row, -1 if after is None else after)


async def _queued_events(stream: QueuedStream, row: QueuedMessage, after: int) -> AsyncIterator[tuple[dict, str]]:
    key = (row.resource_id, row.thread_id)
    first = 0
    if row.mode == QueuedMessage.ENQUEUE:
        if after < 0:
            event = {**queued_event(row), "seq": 0, "turnId": row.turn_id, "threadId": row.thread_id}
            yield event, json.dumps(event)
        first = 1
    misses = 0
    async with streams.ThreadWatch(key) as watch:  # before looking: a change from now on wakes it
        while True:
            try:
                fresh = await sync_to_async(queued.get_sync)(row.queue_id)
            except DatabaseError:
                fresh = row  # the database blinked: look again shortly
            ending = _outcome(fresh)
            if ending is None and fresh.state in (QueuedMessage.STARTING, QueuedMessage.STARTED):
                try:
                    found = await streams.follow(*key, turn_id=fresh.turn_id, after=max(after, first - 1))
                except NotFound:
                    found = None
                    misses += 1
                    if fresh.state == QueuedMessage.STARTED and misses >= FOLLOW_TRIES:
                        ending = events.error_event(
                            "turn_lost", "this message's turn ran and ended; follow the thread again")
                except streams.ChannelLayerDown as down:
                    ending = streams.down_event(down)
                else:
                    stream.current = fresh.turn_id
                    async with contextlib.aclosing(found.texts()) as pairs:
                        async for pair in pairs:
                            yield pair
                    return
            if ending is not None:
                event = {**ending, "seq": first, "turnId": row.turn_id, "threadId": row.thread_id}
                yield event, json.dumps(event)
                return
            woke = await watch.wait(min(0.1 * 2 ** misses, streams.idle_seconds()) if misses else streams.idle_seconds())
            # Another message's turn started (the queue goes on): nothing of this
            # row changed, so no read (with many waiting, their reads would
            # delay the turn that just started).
            while woke and fresh is not None and fresh.state == QueuedMessage.WAITING and row.turn_id not in woke:
                woke = await watch.wait(streams.idle_seconds())


def _outcome(row: QueuedMessage | None) -> dict | None:
    """The ``error`` that ends a queued message's stream before its turn ran, or None."""
    if row is None:
        return events.error_event("thread_deleted", "the thread was deleted; its queued message was dropped")
    if row.state == QueuedMessage.CANCELLED:
        return events.error_event("cancelled", "the queued message was cancelled")
    if row.state == QueuedMessage.FAILED:
        return events.error_event(row.error_code or "turn_failed", row.error_message or "the message was refused")
    return None
