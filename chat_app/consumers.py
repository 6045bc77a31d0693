"""Websocket: ``ws/chat/`` (contract §5). The same turns as the SSE views."""

import asyncio
import json
import logging
import time

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError

from sessions_app.errors import ApiError
from sessions_app.resources import auth_required, reauthenticate, resolve_resource

from . import approvals, events, metrics, queue, streams
from .pool import pool
from .schemas import parse_frame
from .turns import Turn, start_turn

log = logging.getLogger("omni.chat")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """Many turns per connection, on several threads at once. Frames:
    ``message``, ``fork``, ``interrupt``, ``follow``, ``approval``, ``cancel``. Whatever goes wrong
    handling a frame becomes an ``error`` event (naming the frame's
    ``threadId``) and the socket stays open. Closing the socket stops
    forwarding; the turns themselves run to their end.

    Each turn's events are forwarded by a task of its own, keyed by the
    turn's id (never by thread: a thread's next turn may start while the
    last one's forwarder is still sending its ``done``); a forwarder and
    its turn are dropped from the connection once it ended.

    The caller is checked again while the socket is open (contract §6):
    against the database at every frame, before the frame is handled (a
    frame may start, queue or decide a turn), and at most every
    ``OMNI_WS_RECHECK_SECONDS`` on a forwarded event. Once its credentials
    no longer hold (a revoked or expired token, an inactive user, a
    logged-out session, a changed password) the socket closes with 4401,
    handling no more frames and forwarding no more events; a caller that
    lost its cross-resource right gets no more events of another resource's
    turns. The turns themselves run on: they belong to their resource.

    The consumer itself is not on the channel layer (no channel of its own:
    nothing is ever sent to one): other workers' turns reach it through
    :mod:`chat_app.streams`, so a Redis outage costs a follower its follow
    (an ``error`` event), never the socket (channels' own receive loop
    failing would close it with 1011)."""

    channel_layer_alias = "omni.none"  # no such layer: get_channel_layer() gives None

    async def connect(self):
        user = self.scope.get("user")
        if auth_required() and not (user and user.is_authenticated):
            await self.close(code=4401)
            return
        self.forwarders: dict[str, asyncio.Task] = {}  # turn id -> its forwarder
        self.streams: dict[str, streams.Stream] = {}  # turn id -> the stream its forwarder sends
        self.own_turns: dict[str, Turn] = {}  # thread id -> the turn this socket started
        self.checked_at = time.monotonic()  # the caller was authenticated at the handshake
        self.recheck = asyncio.Lock()
        self.lost = False  # the caller's credentials no longer hold: closing with 4401
        await self.accept()
        metrics.websocket_opened(self)
        pool.fill_spares()  # a chat client is here: have a process ready for its new thread

    async def disconnect(self, code):
        metrics.websocket_closed(self)
        for task in list(getattr(self, "forwarders", {}).values()):
            task.cancel()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        thread_id = None
        try:
            if not await self.authorized(fresh=True):
                return  # closed with 4401: the frame is not handled
            data = json.loads(text_data if text_data is not None else bytes_data)
            if isinstance(data, dict) and isinstance(data.get("threadId"), str):
                thread_id = data["threadId"][:128]
            await self.handle(parse_frame(data))
        except (TypeError, ValueError, RecursionError):
            await self.reply_error(events.error_event("bad_request", "a frame must be JSON"), thread_id)
        except ApiError as exc:
            await self.reply_error(events.error_event(exc.code, exc.message, exc.retry_after), thread_id)
        except DatabaseError:
            log.exception("[CHAT] Database error handling a websocket frame")
            await self.reply_error(events.error_event(
                "unavailable", "the database is unreachable; try again shortly", retry_after=2), thread_id)
        except Exception:
            log.exception("[CHAT] Failed to handle a websocket frame")
            await self.reply_error(events.error_event(
                "internal_error", "the server could not handle this frame"), thread_id)

    async def authorized(self, fresh: bool = False) -> bool:
        """Whether the caller's credentials still hold: checked against the
        database now when ``fresh`` (a frame), else when the last check is
        ``OMNI_WS_RECHECK_SECONDS`` old (a forwarded event); the fresh user
        (and its cross-resource right) replaces the scope's. When they no
        longer hold: False, every forwarder stops and the socket closes with
        4401."""
        if self.lost:
            return False
        if not auth_required():  # OMNI_AUTH=off: nothing to check
            return True
        if not fresh and time.monotonic() - self.checked_at < settings.OMNI_WS_RECHECK_SECONDS:
            return True
        async with self.recheck:
            if self.lost:
                return False
            if not fresh and time.monotonic() - self.checked_at < settings.OMNI_WS_RECHECK_SECONDS:
                return True
            user = await reauthenticate(self.scope)
            self.checked_at = time.monotonic()
            if user is not None:
                self.scope["user"] = user
                return True
            self.lost = True
        log.info("[CHAT] A websocket's credentials no longer hold: closing it (4401)")
        current = asyncio.current_task()
        for task in list(self.forwarders.values()):
            if task is not current:
                task.cancel()
        await self.close(code=4401)
        return False

    async def may_forward(self, resource: str | None, thread_id: str) -> bool:
        """Whether the next event of a turn of ``resource`` may go to this socket."""
        try:
            if not await self.authorized():
                return False
        except DatabaseError:
            log.warning("[CHAT] Could not check a websocket's caller again (database); checking later")
            return True
        if resource is None:
            return True
        try:
            resolve_resource(self.scope.get("user"), resource)
        except ApiError as exc:
            await self.reply_error(events.error_event(exc.code, exc.message), thread_id or None)
            return False
        return True

    async def reply_error(self, event: dict, thread_id: str | None) -> None:
        if thread_id is not None:
            event["threadId"] = thread_id
        await self.send_json(event)

    async def handle(self, frame):
        user = self.scope.get("user")
        if frame.type in ("message", "fork"):
            turn = await start_turn(user, frame, fork=frame.type == "fork")
            if isinstance(turn, queue.QueuedStream):  # a busy thread queued it (ifBusy)
                self.forward(turn, resource=turn.resource_id)
                return
            self.own_turns[turn.spec.thread_id] = turn
            self.forward(streams.Stream.of(turn), own=turn,
                         resource=turn.spec.resource_id)
        elif frame.type == "cancel":  # as DELETE /api/chat/queue; the queued stream ends with `cancelled`
            await queue.cancel(resolve_resource(user, frame.resourceId), frame.threadId, frame.queueId)
        elif frame.type == "interrupt":
            turn = self.own_turns.get(frame.threadId)
            if turn is not None and not turn.finished:
                resolve_resource(user, turn.spec.resource_id)  # still the caller's to stop
                await turn.interrupt()
            else:  # this worker's turn or another's: the one running on the thread
                await streams.interrupt(resolve_resource(user, frame.resourceId), frame.threadId)
        elif frame.type == "follow":
            resource = resolve_resource(user, frame.resourceId)
            stream = await queue.follow(resource, frame.threadId, turn_id=frame.turnId,
                                          after=frame.afterSeq, exclude=self.streaming())
            if stream is not None:  # None: already streaming this turn to this socket
                self.forward(stream, resource=resource)
        elif frame.type == "approval":  # as POST /api/chat/approval; the stream carries the rest
            await approvals.decide(user, frame)

    def streaming(self) -> set[str]:
        """The turns this socket streams: each forwarder's, and the
        continuation a follow of a waiting call went on to."""
        current = (getattr(stream, "current", None) for stream in self.streams.values())
        return set(self.forwarders) | {turn_id for turn_id in current if turn_id}

    def forward(self, stream: "streams.Stream", own: Turn | None = None,
                resource: str | None = None) -> None:
        """Send a turn's events (of ``resource``) to this socket (once per
        turn), while the caller may see them."""
        if stream.turn_id in self.forwarders:
            return

        async def pump():
            last = None
            try:
                async for event, text in stream.texts():  # each event's JSON made once for all
                    if not await self.may_forward(resource, stream.thread_id):
                        return
                    await self.send(text_data=text)
                    last = event
            except Exception:  # the socket stays open: this stream ends with an error
                log.exception("[CHAT] Failed to forward turn %s", stream.turn_id)
                await self.reply_error(events.error_event(
                    "internal_error", "the server could not go on with this stream"), stream.thread_id or None)
                return
            if own is None and (last is None or last["type"] not in ("done", "error")):
                # a cursor at or past the turn's end: nothing more will come
                await self.reply_error(events.error_event(
                    "not_found", f"turn {stream.turn_id!r} has no events after that seq"),
                    stream.thread_id or None)

        task = asyncio.create_task(pump())
        self.forwarders[stream.turn_id] = task
        self.streams[stream.turn_id] = stream

        def ended(_):
            # Forget the turn and its forwarder once it ended: a socket that
            # runs many turns holds none of their events.
            if self.forwarders.get(stream.turn_id) is task:
                del self.forwarders[stream.turn_id]
                self.streams.pop(stream.turn_id, None)
            if own is not None and self.own_turns.get(own.spec.thread_id) is own:
                del self.own_turns[own.spec.thread_id]

        task.add_done_callback(ended)
