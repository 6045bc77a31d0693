"""Streams that resume on any worker, and interrupts that reach any worker.

A turn's events live in the process that runs it (``Turn.events``, numbered
by ``seq``). A listener in the same process reads them straight from the
turn. A listener on another worker (a websocket ``follow`` or
``GET /api/chat/stream``) reaches the owner over the channel layer (Redis);
there is no second copy of the events anywhere:

* every worker has one *hub*: a channel of its own and a task reading it.
  While a turn runs (and ``OMNI_STREAM_LINGER_SECONDS`` after it ends) the
  owner's hub is in the thread's control group ``omni.ctl.<thread hash>``;
* a follower finds the turn in the thread's lease row (its fencing token
  names the turn), makes a channel of its own, joins the thread's event
  group ``omni.evt.<thread hash>`` and *then* sends ``subscribe`` (token,
  ``afterSeq``, its channel) to the control group;
* the owner answers the follower directly with every event after
  ``afterSeq`` (the replay), and from then on sends each new event of the
  turn to the event group. A turn nobody follows from afar sends nothing;
* the follower holds events by ``seq`` and yields them in order, each once:
  an event that came both in the replay and live is dropped, a gap (a
  message the layer dropped) is asked for again with a new ``subscribe``.
  It ends after ``done`` or ``error``; a turn whose owner stops answering
  (a worker that died) ends the stream with an ``error`` (``turn_lost``).

The replay is answered by the owner rather than read from a store because
the owner has the events anyway, in order, for exactly as long as they are
useful; nothing has to be written per event or expired, and a follower
can only get a turn's events from the process that holds its lease.

``interrupt`` works the same way: a worker that does not run the turn sends
it to the thread's control group and the owner interrupts its turn.

Without ``REDIS_URL`` (the in-memory layer) every turn is local: follows
and interrupts only ever find turns of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import AsyncIterator

from channels.layers import InMemoryChannelLayer, get_channel_layer

from sessions_app.errors import NotFound

from . import events, leases

log = logging.getLogger("omni.chat")

HANDSHAKE_SECONDS = 2.0  # how long a follower waits for the owner's first answer
GAP_SECONDS = 0.5  # a missing seq is asked for again after this
REPLAY_BATCH = 100  # events per replay message
TERMINAL = ("done", "error")


def layer():
    return get_channel_layer()


def distributed() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    current = layer()
    return current is not None and not isinstance(current, InMemoryChannelLayer)


def _hash(key: tuple[str, str]) -> str:
    return hashlib.sha1("\0".join(key).encode()).hexdigest()


def control_group(key: tuple[str, str]) -> str:
    return f"omni.ctl.{_hash(key)}"


def event_group(key: tuple[str, str]) -> str:
    return f"omni.evt.{_hash(key)}"


def idle_seconds() -> float:
    """A follower that heard nothing for this long asks the owner if it lives."""
    return max(min(leases.lease_seconds() / 2, 5.0), 0.2)


# --- the owner's side ------------------------------------------------------------

class Hub:
    """This process's end of the channel layer: answers ``subscribe`` and
    ``interrupt`` for the turns it runs, and sends their events to remote
    followers."""

    def __init__(self):
        self.channel: str | None = None
        self._reader: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._outbox: asyncio.Queue | None = None
        self._loop = None

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
        self._reader = loop.create_task(self._read())
        self._sender = loop.create_task(self._send())

    async def attach(self, turn) -> None:
        """A turn started here: answer for its thread."""
        if not distributed():
            return
        try:
            await self._ensure_started()
            await layer().group_add(control_group(turn.spec.key), self.channel)
        except Exception:  # the turn runs; only followers from afar miss it
            log.warning("channel layer unavailable: thread %s is not followable from other workers",
                        turn.spec.thread_id, exc_info=True)

    async def detach(self, key: tuple[str, str]) -> None:
        """No turn of this thread is kept here any more: stop answering."""
        from .turns import registry

        if not distributed() or self.channel is None or registry.find(*key, finished=True):
            return
        with contextlib.suppress(Exception):
            await layer().group_discard(control_group(key), self.channel)

    def publish(self, turn, event: dict) -> None:
        """Send a turn's new event to its remote followers (in order)."""
        if self._outbox is not None:
            self._outbox.put_nowait((event_group(turn.spec.key), {
                "type": "omni.event", "token": turn.token, "event": event}))

    async def _send(self) -> None:
        while True:
            group, message = await self._outbox.get()
            try:
                await layer().group_send(group, message)
            except Exception:  # followers notice the gap or the silence
                log.warning("could not publish an event to %s", group, exc_info=True)

    async def _read(self) -> None:
        from .turns import registry

        while True:
            try:
                message = await layer().receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("hub: channel layer receive failed", exc_info=True)
                await asyncio.sleep(1)
                continue
            try:
                key = tuple(message["key"])
                turn = registry.find(*key, finished=True)
                if turn is None or turn.token != message.get("token"):
                    continue  # another worker's turn (or one this worker forgot)
                if message["type"] == "omni.subscribe":
                    await self._replay(turn, message["reply"], int(message.get("after", -1)))
                elif message["type"] == "omni.interrupt" and not turn.finished:
                    log.info("[CHAT] Interrupt from another worker: thread %s", turn.spec.thread_id)
                    await turn.interrupt()
            except Exception:
                log.warning("hub: bad message %r", message, exc_info=True)

    async def _replay(self, turn, reply: str, after: int) -> None:
        # From here on every new event goes to the event group; the ones so
        # far go to the follower directly (it drops what it gets twice).
        turn.on_event = lambda event: self.publish(turn, event)
        snapshot = turn.events[after + 1:]
        batches = [snapshot[i:i + REPLAY_BATCH] for i in range(0, len(snapshot), REPLAY_BATCH)] or [[]]
        for batch in batches:
            await layer().send(reply, {"type": "omni.events", "token": turn.token, "events": batch})

    async def stop(self) -> None:
        for task in (self._reader, self._sender):
            if task is not None:
                task.cancel()
        self._reader = self._sender = None


hub = Hub()


# --- the follower's side ---------------------------------------------------------

async def follow(resource_id: str, thread_id: str, after: int | None = None) -> AsyncIterator[dict]:
    """The events of the thread's running turn after ``seq`` ``after`` (all
    of them when None), wherever the turn runs; then the rest live, through
    ``done`` or ``error``. With a cursor, a turn that ended moments ago
    (``OMNI_STREAM_LINGER_SECONDS``) still counts: a client reconnecting
    gets its tail. Raises 404 when there is no such turn."""
    from .turns import registry

    start = -1 if after is None else after
    turn = registry.get(resource_id, thread_id)
    if turn is not None:
        return turn.listen(start + 1)
    row = await (leases.active if after is None else leases.latest)(resource_id, thread_id)
    if row is not None:
        recent = registry.find(resource_id, thread_id, finished=True)
        if recent is not None and recent.token == row.token:
            return recent.listen(start + 1)
        if distributed():
            return await RemoteFollow.open((resource_id, thread_id), row.token, start)
    raise NotFound(f"no running turn on thread {thread_id!r}")


async def interrupt(resource_id: str, thread_id: str) -> None:
    """Stop the thread's running turn, on this worker or another; 404 if none runs."""
    from .turns import registry

    turn = registry.get(resource_id, thread_id)
    if turn is not None:
        await turn.interrupt()
        return
    row = await leases.active(resource_id, thread_id)
    if row is None or not distributed():
        raise NotFound(f"no running turn on thread {thread_id!r}")
    key = (resource_id, thread_id)
    await layer().group_send(control_group(key), {
        "type": "omni.interrupt", "key": list(key), "token": row.token})


class RemoteFollow:
    """A turn of another worker, read over the channel layer (see the module doc)."""

    def __init__(self, key: tuple[str, str], token: int, after: int, channel: str):
        self.key, self.token, self.channel = key, token, channel
        self.next = after + 1
        self.pending: dict[int, dict] = {}
        self.heard = time.monotonic()

    @classmethod
    async def open(cls, key: tuple[str, str], token: int, after: int) -> AsyncIterator[dict]:
        channel = await layer().new_channel()
        follow = cls(key, token, after, channel)
        await layer().group_add(event_group(key), channel)
        try:
            await follow._subscribe()
            try:
                async with asyncio.timeout(HANDSHAKE_SECONDS):
                    # live events may come before the replay: keep them too
                    while follow._take(await layer().receive(channel)) != "omni.events":
                        pass
            except TimeoutError:
                raise NotFound(f"no running turn on thread {key[1]!r}") from None
        except BaseException:
            await follow._close()
            raise
        return follow._events()

    async def _subscribe(self) -> None:
        await layer().group_send(control_group(self.key), {
            "type": "omni.subscribe", "key": list(self.key), "token": self.token,
            "reply": self.channel, "after": self.next - 1})

    def _take(self, message: dict) -> str | None:
        """Keep a message's events; its type if it is of this turn."""
        if message.get("token") != self.token:
            return None
        if message["type"] == "omni.events":
            batch = message["events"]
        elif message["type"] == "omni.event":
            batch = [message["event"]]
        else:
            return None
        self.heard = time.monotonic()
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
                wait = GAP_SECONDS if self.pending else idle_seconds()
                try:
                    async with asyncio.timeout(wait):
                        self._take(await layer().receive(self.channel))
                    continue
                except TimeoutError:
                    pass
                if not self.pending and time.monotonic() - self.heard > 3 * idle_seconds():
                    yield {**events.error_event(
                        "turn_lost", "the worker running this turn stopped answering"), "seq": self.next}
                    return
                await self._subscribe()  # a gap, or a quiet turn: ask the owner again
        finally:
            await self._close()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await layer().group_discard(event_group(self.key), self.channel)
