"""Websocket: ``ws/chat/`` (contract §5). The same turns as the SSE views."""

import asyncio
import json
import logging

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db import DatabaseError

from sessions_app.errors import ApiError
from sessions_app.resources import auth_required, resolve_resource

from . import events, streams
from .pool import pool
from .schemas import parse_frame
from .turns import Turn, start_turn

log = logging.getLogger("omni.chat")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """Many turns per connection, on several threads at once. Frames:
    ``message``, ``fork``, ``interrupt``, ``follow``. Whatever goes wrong
    handling a frame becomes an ``error`` event (naming the frame's
    ``threadId``) and the socket stays open. Closing the socket stops
    forwarding; the turns themselves run to their end.

    Each turn's events are forwarded by a task of its own, keyed by the
    turn's id (never by thread: a thread's next turn may start while the
    last one's forwarder is still sending its ``done``); a forwarder and
    its turn are dropped from the connection once it ended."""

    async def connect(self):
        user = self.scope.get("user")
        if auth_required() and not (user and user.is_authenticated):
            await self.close(code=4401)
            return
        self.forwarders: dict[str, asyncio.Task] = {}  # turn id -> its forwarder
        self.own_turns: dict[str, Turn] = {}  # thread id -> the turn this socket started
        await self.accept()
        pool.fill_spares()  # a chat client is here: have a process ready for its new thread

    async def disconnect(self, code):
        for task in list(getattr(self, "forwarders", {}).values()):
            task.cancel()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        thread_id = None
        try:
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

    async def reply_error(self, event: dict, thread_id: str | None) -> None:
        if thread_id is not None:
            event["threadId"] = thread_id
        await self.send_json(event)

    async def handle(self, frame):
        user = self.scope.get("user")
        if frame.type in ("message", "fork"):
            turn = await start_turn(user, frame, fork=frame.type == "fork")
            self.own_turns[turn.spec.thread_id] = turn
            self.forward(streams.Stream(turn.turn_id, turn.listen(), turn.spec.thread_id), own=turn)
        elif frame.type == "interrupt":
            turn = self.own_turns.get(frame.threadId)
            if turn is not None and not turn.finished:
                await turn.interrupt()
            else:  # this worker's turn or another's: the one running on the thread
                await streams.interrupt(resolve_resource(user, frame.resourceId), frame.threadId)
        elif frame.type == "follow":
            resource = resolve_resource(user, frame.resourceId)
            stream = await streams.follow(resource, frame.threadId, turn_id=frame.turnId,
                                          after=frame.afterSeq, exclude=self.forwarders)
            if stream is not None:  # None: already streaming this turn to this socket
                self.forward(stream)

    def forward(self, stream: "streams.Stream", own: Turn | None = None) -> None:
        """Send a turn's events to this socket (once per turn)."""
        if stream.turn_id in self.forwarders:
            return

        async def pump():
            last = None
            async for event in stream:
                await self.send_json(event)
                last = event
            if own is None and (last is None or last["type"] not in ("done", "error")):
                # a cursor at or past the turn's end: nothing more will come
                await self.reply_error(events.error_event(
                    "not_found", f"turn {stream.turn_id!r} has no events after that seq"),
                    stream.thread_id or None)

        task = asyncio.create_task(pump())
        self.forwarders[stream.turn_id] = task

        def ended(_):
            # Forget the turn and its forwarder once it ended: a socket that
            # runs many turns holds none of their events.
            if self.forwarders.get(stream.turn_id) is task:
                del self.forwarders[stream.turn_id]
            if own is not None and self.own_turns.get(own.spec.thread_id) is own:
                del self.own_turns[own.spec.thread_id]

        task.add_done_callback(ended)
