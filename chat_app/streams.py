"""Streams that resume on any worker, and interrupts and deletes that reach
every worker.

A turn's events live in the process that runs it (its
:class:`~chat_app.turns.buffer.EventLog`, numbered by ``seq`` and named by
``turnId``). A listener in the same process reads them straight from the
turn. A listener on another worker (a websocket ``follow`` or
``GET /api/chat/stream``) reaches the owner over the channel layer (Redis);
there is no second copy of the events anywhere:

* every worker has one *hub*: a channel of its own and a task reading it.
  While a turn runs (and ``OMNI_STREAM_LINGER_SECONDS`` after it ends) the
  owner's hub is in the turn's control group ``omni.ctl.<turnId>``;
* a follower finds the turn in the thread's lease row (its ``turn_id``
  names the thread's latest turn), makes a channel of its own, joins the
  turn's event group ``omni.evt.<turnId>`` and *then* sends ``subscribe``
  (``afterSeq`` and its channel) to the control group;
* the owner answers the follower directly with every event after
  ``afterSeq`` (the replay), and from then on sends each new event of the
  turn to the event group. A turn nobody follows from afar sends nothing;
* the follower holds events by ``seq`` and yields them in order, each once:
  an event that came both in the replay and live is dropped, a gap (a
  message the layer dropped) is asked for again with a new ``subscribe``.
  It ends after ``done`` or ``error``; a turn whose owner stops answering
  (a worker that died) ends the stream with an ``error`` (``turn_lost``).

A cursor names its turn (``turnId`` and ``seq``): a client reconnecting
after its turn ended never gets the next turn's events as the old one's
tail. Everything is keyed by turn, never by thread.

``interrupt`` works the same way: a worker that does not run the turn sends
it to the turn's control group and the owner acknowledges it; an interrupt
nobody acknowledges is answered with ``turn_lost``. A delete is broadcast to
every worker's hub (group ``omni.workers``): the thread's running turn stops
and its warm client closes wherever they are.

A ``follow`` of a thread on which no turn runs, but whose tool call waits
for a decision (or was decided and waits for its continuation: contract §9,
also after every server process restarted), replays the call's
``approval_request`` and then waits for the turn that goes on after the
decision, wherever it starts (the sweeper, or a decision, on any worker),
and streams it through ``done``: a follower joins the thread's group
``omni.thr.<hash of resource and thread>`` and a continuation announces
itself there when it starts (registry ``started`` hook, after the hub
answers for it); on this worker the same hook wakes the follower directly.
The follower also looks at the call and the lease every
:func:`idle_seconds` (an announcement the layer dropped), and gives up after
the call's expiry (or its decision) plus :data:`CONTINUATION_GRACE_SECONDS`.

Without ``REDIS_URL`` (the in-memory layer) every turn is local: follows,
interrupts and deletes only ever find turns of this process.

When the channel layer (Redis) stops answering (issue 22, item 6), turns go
on running on their own workers; only what crosses workers stops. A
follower from afar gets an ``error`` event (``unavailable``, with
``retryAfter``) and its stream ends (SSE) or its socket stays open
(websocket); a follow, an interrupt from afar meanwhile is that same error
(503). :data:`layer_health` logs one line when the layer goes and one when
it is back, never a traceback per attempt: the hub's reader (always waiting
on the layer, so the first to notice) pings it with a growing pause
(:data:`RETRY_SECONDS`) until it answers, then joins its groups again (a
restarted Redis has forgotten them). Clients follow again once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import AsyncIterator

from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.utils import timezone

from sessions_app import toolcalls as calls
from sessions_app.errors import NotFound, Unavailable

from . import events, leases
from .pool import pool
from .turns import registry
from .turns.buffer import TERMINAL
from .turns.runner import DELETED

log = logging.getLogger("omni.chat")

HANDSHAKE_SECONDS = 2.0  # how long a follower (or an interrupt) waits for the owner's answer
GAP_SECONDS = 0.5  # a missing seq is asked for again after this
REPLAY_BATCH = 100  # events per replay message
WORKERS_GROUP = "omni.workers"  # every worker's hub: thread deletions
# A follower waiting for the turn that goes on after a decision gives up
# this long after the call's expiry (a pending call) or its decision.
CONTINUATION_GRACE_SECONDS = 60.0
RETRY_SECONDS = (0.25, 2.0)  # pauses between pings of a channel layer that is down: first, longest


def layer():
    return get_channel_layer()


def distributed() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    current = layer()
    return current is not None and not isinstance(current, InMemoryChannelLayer)


async def ping() -> None:
    """One round trip to the channel layer; raises when it does not answer."""
    current = layer()
    if hasattr(current, "connection"):  # channels_redis
        await current.connection(0).ping()
    else:  # another backend: a message through it
        channel = await current.new_channel()
        await current.send(channel, {"type": "omni.ping"})
        await current.receive(channel)


class LayerHealth:
    """Whether the channel layer answers, as this process last saw it: one
    log line when an operation on it first fails, one when it answers again
    (:meth:`until_back`), whatever the number of failed attempts between."""

    def __init__(self):
        self.down_since: float | None = None
        self.on_back: list = []  # async callables run when it answers again (the hub rejoins its groups)
        self._watch: asyncio.Task | None = None

    def failed(self, doing: str, exc: BaseException) -> None:
        """An operation on the layer failed (``doing`` it): logged if it is the outage's first."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("channel layer unreachable (%s: %s: %s): turns run on, followers on other "
                        "workers get an error until it is back", doing, type(exc).__name__, exc)

    async def until_back(self) -> None:
        """Wait until the layer answers a ping again (one pinging task per
        process, its pause doubling up to the longest of :data:`RETRY_SECONDS`)."""
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.done() or self._watch.get_loop() is not loop:
            self._watch = loop.create_task(self._wait_back(), name="omni-channel-layer-watch")
        await asyncio.shield(self._watch)

    def answered(self) -> None:
        """An operation on the layer worked: logged if it ends an outage."""
        if self.down_since is not None:
            log.warning("channel layer reachable again after %.1f s: followers can follow again",
                        time.monotonic() - self.down_since)
            self.down_since = None

    async def _wait_back(self) -> None:
        pause, longest = RETRY_SECONDS
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            try:
                await ping()
                for hook in list(self.on_back):
                    await hook()
            except Exception:
                continue
            self.answered()
            return


layer_health = LayerHealth()


class ChannelLayerDown(Unavailable):
    """The channel layer (Redis) does not answer: 503 ``unavailable``. Made
    from the failure (``exc``, met ``doing`` something), which it reports to
    :data:`layer_health`."""

    def __init__(self, doing: str, exc: BaseException):
        layer_health.failed(doing, exc)
        super().__init__("the channel layer is unreachable: this turn cannot be followed from this "
                         "server process for now; follow it again shortly")


def down_event(down: ChannelLayerDown) -> dict:
    """The ``error`` event that ends a follow when the channel layer is down."""
    return events.error_event(down.code, down.message, down.retry_after)


def control_group(turn_id: str) -> str:
    return f"omni.ctl.{turn_id}"


def event_group(turn_id: str) -> str:
    return f"omni.evt.{turn_id}"


def thread_group(key: tuple[str, str]) -> str:
    """The group of the followers waiting for a turn of thread ``key``
    (a group name is at most 99 ASCII characters: a hash of the key)."""
    return "omni.thr." + hashlib.sha1(f"{key[0]}\0{key[1]}".encode()).hexdigest()


def idle_seconds() -> float:
    """A follower that heard nothing for this long asks the owner if it lives."""
    return max(min(leases.lease_seconds() / 2, 5.0), 0.2)


class TurnLost(Unavailable):
    """The worker running the turn does not answer (it died, or cannot be reached)."""

    code = "turn_lost"


@dataclass
class Stream:
    """A turn's events for one listener: ``turn_id`` and an async iterator
    (which ends after the turn's last event, or at once for a cursor past it).
    A local turn's stream reads its log from ``start`` (:meth:`texts` gives
    each event's JSON made once for every listener); a remote one the
    follower's iterator."""

    turn_id: str
    events: AsyncIterator[dict] | None = None
    thread_id: str = ""
    log: object | None = None  # the turn's EventLog, for a turn of this process
    start: int = 0

    @classmethod
    def of(cls, turn, start: int = 0) -> "Stream":
        return cls(turn.turn_id, None, turn.spec.thread_id, turn.log, start)

    def __aiter__(self):
        if self.events is None:
            self.events = self.log.listen(self.start)
        return self.events

    async def texts(self) -> AsyncIterator[tuple[dict, str]]:
        """Each event with its JSON."""
        if self.log is not None:
            async for pair in self.log.listen_json(self.start):
                yield pair
        else:
            async for event in self:
                yield event, json.dumps(event)


# --- the owner's side ------------------------------------------------------------

async def received(channel: str, who: str) -> AsyncIterator[dict]:
    """The messages of a channel of this process, as they come; a failing
    channel layer (Redis down) is waited out (:meth:`LayerHealth.until_back`)."""
    while True:
        try:
            message = await layer().receive(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            layer_health.failed(f"{who} receiving", exc)
            await layer_health.until_back()
            continue
        yield message


class Hub:
    """This process's end of the channel layer: answers ``subscribe`` and
    ``interrupt`` for the turns it runs, sends their events to remote
    followers, and hears thread deletions made on other workers."""

    def __init__(self):
        self.channel: str | None = None
        self._reader: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._outbox: asyncio.Queue | None = None
        self._loop = None
        self._published: set[str] = set()  # turns whose events go to their event group
        self._answering: set[str] = set()  # turns whose control group it is in
        layer_health.on_back.append(self._rejoin)

    async def start(self) -> None:
        """Join the channel layer (with the server: :func:`chat_app.lifecycle.startup`).
        A layer that is down then is joined again by the next turn (:meth:`attach`)."""
        if not distributed():
            return
        try:
            await self._ensure_started()
        except Exception as exc:  # the next turn joins it again (attach)
            layer_health.failed("joining it at start", exc)
        else:
            layer_health.answered()

    async def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._loop is loop and not self._reader.done():
            return
        self._loop = loop
        self._reader = self._sender = None
        # The default prefix: channels_redis reads every process-local
        # channel through one Redis key, so all of them must share it.
        channel = await layer().new_channel()
        if self._reader is not None:  # another turn started the hub meanwhile
            return
        self.channel = channel
        self._outbox = asyncio.Queue()
        self._published = set()
        self._reader = loop.create_task(self._read())
        self._sender = loop.create_task(self._send())
        await layer().group_add(WORKERS_GROUP, channel)

    async def attach(self, turn) -> None:
        """A turn started here: answer for it (registry ``started`` hook)."""
        if not distributed():
            return
        self._answering.add(turn.turn_id)
        try:
            await self._ensure_started()
            await layer().group_add(control_group(turn.turn_id), self.channel)
        except Exception as exc:  # the turn runs; only followers from afar miss it (until it is back)
            layer_health.failed(f"answering for turn {turn.turn_id}", exc)
        else:
            layer_health.answered()

    async def _rejoin(self) -> None:
        """The layer answers again: join the groups of the hub (a restarted
        Redis forgot them) for the turns it still answers for."""
        if self.channel is None or self._reader is None:
            return
        await layer().group_add(WORKERS_GROUP, self.channel)
        for turn_id in list(self._answering):
            await layer().group_add(control_group(turn_id), self.channel)

    def forgotten(self, turn) -> None:
        """A turn's linger ended (registry ``forgotten`` hook): stop answering."""
        self._published.discard(turn.turn_id)
        self._answering.discard(turn.turn_id)
        if distributed() and self.channel is not None:
            asyncio.ensure_future(self._discard(control_group(turn.turn_id)))

    async def _discard(self, group: str) -> None:
        with contextlib.suppress(Exception):
            await layer().group_discard(group, self.channel)

    def publish(self, turn_id: str, event: dict) -> None:
        """Send a turn's new event to its remote followers (in order)."""
        if self._outbox is not None:
            self._outbox.put_nowait((event_group(turn_id), {
                "type": "omni.event", "turn": turn_id, "event": event}))

    async def _send(self) -> None:
        while True:
            group, message = await self._outbox.get()
            try:
                await layer().group_send(group, message)
            except Exception as exc:  # followers notice the gap or the silence
                layer_health.failed(f"publishing to {group}", exc)
            else:
                layer_health.answered()

    async def _read(self) -> None:
        async for message in received(self.channel, "hub"):
            try:
                await self._handle(message)
            except Exception:
                log.warning("hub: bad message %r", message, exc_info=True)

    async def _handle(self, message: dict) -> None:
        kind = message["type"]
        if kind == "omni.deleted":
            if message.get("origin") != self.channel:
                await stop_thread(tuple(message["key"]), remote=True)
            return
        turn = registry.by_id(message.get("turn", ""))
        if turn is None:
            return  # another worker's turn (or one this worker forgot)
        if kind == "omni.decided":  # a decision on the call this turn waits for
            turn.wake()
        elif kind == "omni.subscribe":
            await self._replay(turn, message["reply"], int(message.get("after", -1)))
        elif kind == "omni.interrupt":
            if not turn.finished:
                log.info("[CHAT] Interrupt from another worker: thread %s turn %s",
                         turn.spec.thread_id, turn.turn_id)
                await turn.interrupt()
            await self._answer(message["reply"], {"type": "omni.interrupted", "turn": turn.turn_id})

    async def _answer(self, reply: str, message: dict) -> bool:
        """Send ``message`` to a follower's (or an interrupter's) channel;
        False when the channel layer failed (it waits for it again)."""
        try:
            await layer().send(reply, message)
        except Exception as exc:
            layer_health.failed("answering another worker", exc)
            return False
        return True

    async def _replay(self, turn, reply: str, after: int) -> None:
        # From here on every new event goes to the event group; the ones so
        # far go to the follower directly (it drops what it gets twice).
        if turn.turn_id not in self._published:
            self._published.add(turn.turn_id)
            turn.log.on_event.append(lambda event: self.publish(turn.turn_id, event))
        snapshot = turn.events[after + 1:]
        batches = [snapshot[i:i + REPLAY_BATCH] for i in range(0, len(snapshot), REPLAY_BATCH)] or [[]]
        last = len(turn.events) - 1 if turn.finished else None  # the turn's end, once known
        for batch in batches:
            if not await self._answer(reply, {"type": "omni.events", "turn": turn.turn_id, "events": batch,
                                              "last": last}):
                return

    async def broadcast_deleted(self, key: tuple[str, str]) -> None:
        """Tell every other worker that the thread ``key`` was deleted."""
        if not distributed():
            return
        try:
            await layer().group_send(WORKERS_GROUP, {
                "type": "omni.deleted", "key": list(key), "origin": self.channel})
        except Exception as exc:  # their leases go with the row; warm clients with the janitor
            layer_health.failed(f"telling other workers that thread {key[1]} was deleted", exc)

    async def stop(self) -> None:
        for task in (self._reader, self._sender):
            if task is not None:
                task.cancel()
        self._reader = self._sender = None


hub = Hub()  # its hooks on the registry are set when the app loads (chat_app.apps)


# --- followers waiting for a thread's next turn (a decided call's continuation) -------

class Woken(asyncio.Event):
    """A :class:`ThreadWatch`'s wake, and why: the turns that started on the
    thread (:meth:`started`), or anything else (``set()``: the thread's
    queue changed, the thread was deleted)."""

    def __init__(self):
        super().__init__()
        self.turns: set[str] = set()
        self.other = False

    def started(self, turn_id: str) -> None:
        self.turns.add(turn_id)
        super().set()

    def wake(self, turn_id: str | None) -> None:
        """Turn ``turn_id`` started on the thread, or (None) anything else."""
        if turn_id:
            self.started(turn_id)
        else:
            self.set()

    def set(self) -> None:
        self.other = True
        super().set()

    def clear(self) -> None:
        self.turns, self.other = set(), False
        super().clear()


_watchers: dict[tuple[str, str], set[Woken]] = {}  # thread -> its waiting followers here


async def announce_started(turn) -> None:
    """A turn started here (registry ``started`` hook, after the hub's: it
    answers for the turn already): wake this worker's followers waiting for
    the thread, and, for a continuation after a decision or a queued
    message, every other worker's (someone may wait for it on another one)."""
    spec = turn.spec
    await wake_thread(spec.key, turn.turn_id,
                      everywhere=spec.continuation is not None or spec.queue_id is not None)


def _wake_here(key: tuple[str, str], turn_id: str | None = None) -> None:
    for woken in _watchers.get(key, ()):
        woken.wake(turn_id)


async def wake_thread(key: tuple[str, str], turn_id: str | None = None, *, everywhere: bool = True) -> None:
    """Wake the followers waiting for thread ``key`` (a :class:`ThreadWatch`):
    turn ``turn_id`` started on it, or (None) its queue changed. This
    worker's at once and, ``everywhere``, every other worker's through the
    thread's group on the channel layer."""
    _wake_here(key, turn_id)
    if not everywhere or not distributed():
        return
    message = {"type": "omni.started", "turn": turn_id} if turn_id else {"type": "omni.queue"}
    try:
        await layer().group_send(thread_group(key), message)
    except Exception as exc:  # the followers look at the call, the queue and the lease again anyway
        layer_health.failed(f"waking the followers of thread {key[1]}", exc)


class ThreadWatch:
    """Wakes (:meth:`wait`) when a turn starts on thread ``key``: on this
    worker (:func:`announce_started`), or a continuation or a queued message
    on another one (the thread's group on the channel layer); also when the
    thread's queue changes (:func:`wake_thread`) or the thread is deleted."""

    def __init__(self, key: tuple[str, str]):
        self.key = key
        self.woken = Woken()
        self.channel: str | None = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "ThreadWatch":
        _watchers.setdefault(self.key, set()).add(self.woken)
        if distributed():
            try:
                self.channel = await layer().new_channel()
                await layer().group_add(thread_group(self.key), self.channel)
                self._reader = asyncio.create_task(self._read())
            except Exception as exc:  # the follower looks again every few seconds anyway
                layer_health.failed(f"watching thread {self.key[1]}", exc)
        return self

    async def _read(self) -> None:
        async for message in received(self.channel, f"follower of thread {self.key[1]}"):
            if message.get("type") in ("omni.started", "omni.queue"):
                self.woken.wake(message.get("turn") if message["type"] == "omni.started" else None)

    async def wait(self, timeout: float) -> frozenset[str] | None:
        """Until a turn started on the thread (since the last wait), or
        ``timeout``. The ids of the turns that started, if nothing else woke
        it; None after anything else (a change of the queue, a deletion, a
        timeout)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.woken.wait()
        woke = frozenset(self.woken.turns) if self.woken.is_set() and not self.woken.other else None
        self.woken.clear()
        return woke

    async def __aexit__(self, *exc) -> None:
        watchers = _watchers.get(self.key)
        if watchers is not None:
            watchers.discard(self.woken)
            if not watchers:
                del _watchers[self.key]
        if self._reader is not None:
            self._reader.cancel()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await layer().group_discard(thread_group(self.key), self.channel)


async def send_to_turn(turn_id: str, message: dict) -> None:
    """Send ``message`` to the worker that runs ``turn_id`` (if a channel layer reaches it)."""
    if not distributed():
        return
    try:
        await layer().group_send(control_group(turn_id), {**message, "turn": turn_id})
    except Exception as exc:  # the waiting turn polls its call anyway
        layer_health.failed(f"reaching turn {turn_id}", exc)


# --- deletes ---------------------------------------------------------------------

async def stop_thread(key: tuple[str, str], *, remote: bool = False) -> None:
    """A thread was deleted: its running turn here stops for good (saving
    nothing), its warm client here closes; unless ``remote`` (the news came
    from another worker), every other worker is told the same."""
    await registry.abort(key, "thread_deleted", DELETED)
    pool.forget(key, "deleted")
    _wake_here(key)  # its queued messages' streams end
    if not remote:
        await hub.broadcast_deleted(key)


# --- the follower's side ---------------------------------------------------------

async def follow(resource_id: str, thread_id: str, *, turn_id: str | None = None,
                 after: int | None = None, exclude=()) -> Stream | None:
    """A turn's events, wherever it runs, then the rest live through ``done``
    or ``error``.

    Without ``turn_id``: the thread's running turn, from its start (or after
    ``after``); when none runs but the thread's tool call waits for a
    decision or its continuation, that call's ``approval_request`` and then
    the turn that goes on after the decision (:func:`follow_waiting_call`).
    With ``turn_id``: that turn only, after ``after`` — also if it ended
    moments ago (``OMNI_STREAM_LINGER_SECONDS``), so a reconnecting client
    gets its tail, and never another turn's events. Raises 404 when there is
    no such turn. None if the turn is one of ``exclude`` (turn ids the
    caller streams already)."""
    try:
        return await _follow_turn(resource_id, thread_id, turn_id=turn_id, after=after, exclude=exclude)
    except NotFound:
        if turn_id is not None:
            raise
        return await follow_waiting_call(resource_id, thread_id, exclude=exclude)


async def _follow_turn(resource_id: str, thread_id: str, *, turn_id: str | None = None,
                       after: int | None = None, exclude=()) -> Stream | None:
    """:func:`follow` of a turn that runs (or lingers): 404 if there is none."""
    start = -1 if after is None else after
    key = (resource_id, thread_id)
    missing = NotFound(f"no running turn on thread {thread_id!r}" if turn_id is None
                       else f"turn {turn_id!r} of thread {thread_id!r} is not running any more")
    turn = registry.by_id(turn_id) if turn_id else registry.get(*key)
    if turn is not None and turn.spec.key == key:
        return None if turn.turn_id in exclude else Stream.of(turn, start + 1)
    if turn_id is None:
        row = await leases.active(resource_id, thread_id)
    else:
        row = await leases.latest(resource_id, thread_id)
        linger = timedelta(seconds=float(settings.OMNI_STREAM_LINGER_SECONDS))
        if row is not None and (row.turn_id != turn_id or row.expires_at <= timezone.now() - linger):
            row = None
    if row is None or not row.turn_id or not distributed():
        raise missing
    if row.turn_id in exclude:
        return None
    if (local := registry.by_id(row.turn_id)) is not None:  # ended here meanwhile
        if local.spec.key == key:
            return Stream.of(local, start + 1)
        raise missing
    return Stream(row.turn_id, await RemoteFollow.open(row.turn_id, thread_id, start, missing), thread_id)


class WaitingStream(Stream):
    """A follow of a thread whose call waits (see :func:`follow_waiting_call`):
    its ``turn_id`` names the turn that asked; its events are the replayed
    ``approval_request``, then the continuation's (``current`` names that
    turn once it streams it)."""

    current: str | None = None

    def __aiter__(self):
        async def only_events():
            async with contextlib.aclosing(self.events):
                async for event, _ in self.events:
                    yield event

        return only_events()

    async def texts(self) -> AsyncIterator[tuple[dict, str]]:
        async with contextlib.aclosing(self.events):
            async for pair in self.events:
                yield pair


async def follow_waiting_call(resource_id: str, thread_id: str, *, exclude=()) -> Stream | None:
    """No turn runs on the thread: if its tool call waits for a decision (or
    was decided and waits for the turn that goes on), a stream of the call's
    ``approval_request`` (as it was first published, under the turn that
    asked, with ``seq`` 0: its first position is not kept), then of the
    continuation, wherever it starts, through its ``done``. Raises 404 when
    no call waits; None if the asking turn is one of ``exclude``."""
    key = (resource_id, thread_id)
    call = await sync_to_async(calls.pending_for_thread_sync)(resource_id, thread_id)
    if call is None or not call.approval_id:
        # the continuation may have taken the call up just now (404 if not)
        return await _follow_turn(resource_id, thread_id, exclude=exclude)
    if call.turn_id in exclude:
        return None
    request = {**events.approval_request_event(call), "seq": 0, "turnId": call.turn_id, "threadId": thread_id}
    stream = WaitingStream(call.turn_id, None, thread_id)
    stream.events = _waiting_events(stream, call, key, request)
    return stream


async def _waiting_events(stream: "WaitingStream", call, key: tuple[str, str],
                          request: dict) -> AsyncIterator[tuple[dict, str]]:
    yield request, json.dumps(request)
    async with ThreadWatch(key) as watch:  # before looking: a start from now on wakes it
        while True:
            try:
                found = await _continuation(call, key)
            except ChannelLayerDown as down:
                found = down_event(down)
            if isinstance(found, Stream):
                stream.current = found.turn_id
                # the turn that asked, found still running (a race): only what came after the request
                skip = found.turn_id == call.turn_id
                async with contextlib.aclosing(found.texts()) as pairs:
                    async for event, text in pairs:
                        if skip and event["type"] not in TERMINAL:
                            skip = not (event["type"] == "approval_request"
                                        and event.get("approvalId") == call.approval_id)
                            continue
                        yield event, text
                return
            if isinstance(found, dict):  # gone, waited too long, or the channel layer is down
                event = {**found, "seq": 1, "turnId": call.turn_id, "threadId": key[1]}
                yield event, json.dumps(event)
                return
            await watch.wait(idle_seconds())


async def _continuation(call, key: tuple[str, str]) -> Stream | dict | None:
    """The turn that goes on after ``call``'s decision, as a stream from its
    start; an ``error`` event when none will come; None: not yet."""
    if (turn := registry.get(*key)) is not None:
        return Stream.of(turn)
    fresh = await calls.refresh(call)
    if fresh is None:  # gone with its thread
        return events.error_event("not_found", f"thread {key[1]!r} is gone")
    turn_id = fresh.continued_by
    row = await leases.active(*key)
    if turn_id is None and row is not None and row.turn_id != call.turn_id:
        turn_id = row.turn_id  # a turn started on the thread: it takes the call up
    if turn_id is not None:
        if (local := registry.by_id(turn_id)) is not None and local.spec.key == key:
            return Stream.of(local)
        if distributed():  # running or lingering on another worker
            with contextlib.suppress(NotFound):
                return Stream(turn_id, await RemoteFollow.open(turn_id, key[1], -1, NotFound("")), key[1])
        if fresh.continued_by is not None and (row is None or row.turn_id != turn_id):
            return events.error_event(  # it ran and ended before this follower found it
                "not_found", f"the conversation went on in turn {turn_id!r}, which has ended")
        return None
    since = fresh.expires_at if fresh.status == fresh.PENDING else (fresh.decided_at or fresh.expires_at)
    if since is not None and timezone.now() > since + timedelta(seconds=CONTINUATION_GRACE_SECONDS):
        return events.error_event(
            "turn_lost", "no server process went on after this tool call's decision; follow the thread again")
    return None


async def interrupt(resource_id: str, thread_id: str) -> None:
    """Stop the thread's running turn, on this worker or another. 404 if
    none runs; 503 ``turn_lost`` when the worker holding it does not answer
    (its thread is free again once its lease runs out: ``Retry-After``)."""
    turn = registry.get(resource_id, thread_id)
    if turn is not None:
        await turn.interrupt()
        return
    row = await leases.active(resource_id, thread_id)
    if row is None:
        if not await _deny_waiting_call(resource_id, thread_id):
            raise NotFound(f"no running turn on thread {thread_id!r}")
        return
    if await sync_to_async(leases.expire_dead_sync)(row):
        raise TurnLost(f"the server process running thread {thread_id!r} died; "
                       "the thread is free again")
    left = max(1, int((row.expires_at - timezone.now()).total_seconds()) + 1)
    lost = TurnLost(
        f"the server process running thread {thread_id!r} does not answer; "
        f"the thread is free again within {left} s", retry_after=left)
    if not distributed():
        raise lost
    try:
        channel = await layer().new_channel()
        await layer().group_send(control_group(row.turn_id), {
            "type": "omni.interrupt", "turn": row.turn_id, "reply": channel})
        async with asyncio.timeout(HANDSHAKE_SECONDS):
            while (await layer().receive(channel)).get("type") != "omni.interrupted":
                pass
    except TimeoutError:
        raise lost from None
    except Exception as exc:
        raise ChannelLayerDown(f"interrupting turn {row.turn_id}", exc) from exc


async def _deny_waiting_call(resource_id: str, thread_id: str) -> bool:
    """No turn runs on the thread (its worker restarted): Stop denies the
    call that waits, as it does while a turn waits for it; the conversation
    goes on (the sweeper). False when no call waits."""
    call = await sync_to_async(calls.pending_for_thread_sync)(resource_id, thread_id)
    if call is None:
        return False
    if call.status == call.PENDING and await calls.decide(call, "deny", "interrupt", "the turn was interrupted"):
        from . import approvals  # it imports this module

        log.info("[CHAT] Interrupt denies approval %s (thread %s): no turn waits for it",
                 call.approval_id, thread_id)
        await approvals.notify(call.turn_id)
    return True


class RemoteFollow:
    """A turn of another worker, read over the channel layer (see the module doc)."""

    def __init__(self, turn_id: str, thread_id: str, after: int, channel: str):
        self.turn_id, self.thread_id, self.channel = turn_id, thread_id, channel
        self.next = after + 1
        self.pending: dict[int, dict] = {}
        self.heard = time.monotonic()
        self.ended = False  # the turn ended before ``next``: a cursor past its end

    @classmethod
    async def open(cls, turn_id: str, thread_id: str, after: int,
                   missing: Exception) -> AsyncIterator[dict]:
        try:
            channel = await layer().new_channel()
            follow = cls(turn_id, thread_id, after, channel)
            await layer().group_add(event_group(turn_id), channel)
        except Exception as exc:
            raise ChannelLayerDown(f"following turn {turn_id}", exc) from exc
        try:
            await follow._subscribe()
            try:
                async with asyncio.timeout(HANDSHAKE_SECONDS):
                    # live events may come before the replay: keep them too
                    while follow._take(await layer().receive(channel)) != "omni.events":
                        pass
            except TimeoutError:
                raise missing from None
        except BaseException as exc:
            await follow._close()
            if isinstance(exc, Exception) and not isinstance(exc, NotFound):
                raise ChannelLayerDown(f"following turn {turn_id}", exc) from exc
            raise
        return follow._events()

    async def _subscribe(self) -> None:
        await layer().group_send(control_group(self.turn_id), {
            "type": "omni.subscribe", "turn": self.turn_id, "reply": self.channel,
            "after": self.next - 1})

    def _take(self, message: dict) -> str | None:
        """Keep a message's events; its type if it is of this turn."""
        if message.get("turn") != self.turn_id:
            return None
        if message["type"] == "omni.events":
            batch = message["events"]
        elif message["type"] == "omni.event":
            batch = [message["event"]]
        else:
            return None
        self.heard = time.monotonic()
        if message.get("last") is not None and message["last"] < self.next:
            self.ended = True
        for event in batch:
            if event["seq"] >= self.next:
                self.pending[event["seq"]] = event
        return message["type"]

    async def _events(self) -> AsyncIterator[dict]:
        try:
            while True:
                while self.next in self.pending:
                    event = self.pending.pop(self.next)
                    self.next += 1
                    yield event
                    if event["type"] in TERMINAL:
                        return
                if self.ended:
                    return
                wait = GAP_SECONDS if self.pending else idle_seconds()
                try:
                    async with asyncio.timeout(wait):
                        self._take(await layer().receive(self.channel))
                    continue
                except TimeoutError:
                    pass
                except Exception as exc:  # the channel layer is down: say so, then end
                    yield self._event(down_event(ChannelLayerDown(f"following turn {self.turn_id}", exc)))
                    return
                if not self.pending and time.monotonic() - self.heard > 3 * idle_seconds():
                    yield self._event(events.error_event(
                        "turn_lost", "the worker running this turn stopped answering"))
                    return
                try:
                    await self._subscribe()  # a gap, or a quiet turn: ask the owner again
                except Exception as exc:
                    yield self._event(down_event(ChannelLayerDown(f"following turn {self.turn_id}", exc)))
                    return
        finally:
            await self._close()

    def _event(self, event: dict) -> dict:
        """``event`` (the ``error`` that ends this follow) in the turn's numbering."""
        return {**event, "seq": self.next, "turnId": self.turn_id, "threadId": self.thread_id}

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await layer().group_discard(event_group(self.turn_id), self.channel)
