"""Websocket: ``ws/chat/`` (contract §5). The same turns as the SSE views."""

import asyncio
import json
import logging

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from sessions_app.errors import ApiError
from sessions_app.resources import auth_required, resolve_resource

from . import events, streams
from .schemas import parse_frame
from .pool import pool
from .turns import Turn, start_turn

log = logging.getLogger("omni.chat")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """Many turns per connection. Frames: ``message``, ``fork``, ``interrupt``,
    ``follow``. A bad frame gets an ``error`` event; the socket stays open.
    Closing the socket stops forwarding; the turns themselves run to their end."""

    async def connect(self):
        user = self.scope.get("user")
        if auth_required() and not (user and user.is_authenticated):
            await self.close(code=4401)
            return
        self.forwarders: dict[tuple[str, str], asyncio.Task] = {}
        self.own_turns: dict[str, Turn] = {}
        await self.accept()
        pool.fill_spares()  # a chat client is here: have a process ready for its new thread

    async def disconnect(self, code):
        for task in getattr(self, "forwarders", {}).values():
            task.cancel()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            data = json.loads(text_data if text_data is not None else bytes_data)
        except (TypeError, ValueError):
            await self.send_json(events.error_event("bad_request", "a frame must be JSON"))
            return
        try:
            await self.handle(parse_frame(data))
        except ApiError as exc:
            await self.send_json(events.error_event(exc.code, exc.message, exc.retry_after))

    async def handle(self, frame):
        user = self.scope.get("user")
        if frame.type in ("message", "fork"):
            turn = await start_turn(user, frame, fork=frame.type == "fork")
            self.own_turns[turn.spec.thread_id] = turn
            self.forward(turn.spec.key, turn.listen())
        elif frame.type == "interrupt":
            turn = self.own_turns.get(frame.threadId)
            if turn is not None and not turn.finished:
                await turn.interrupt()
            else:  # this worker's turn or another's: the one running on the thread
                await streams.interrupt(resolve_resource(user, frame.resourceId), frame.threadId)
        elif frame.type == "follow":
            resource = resolve_resource(user, frame.resourceId)
            key = (resource, frame.threadId)
            if (running := self.forwarders.get(key)) and not running.done():
                return  # already streaming this turn to this socket
            self.forward(key, await streams.follow(resource, frame.threadId, frame.afterSeq))

    def forward(self, key: tuple[str, str], stream) -> None:
        """Send a turn's events (an async iterator) to this socket."""
        if (running := self.forwarders.get(key)) and not running.done():
            return  # already streaming this turn to this socket

        async def pump():
            async for event in stream:
                await self.send_json(event)

        self.forwarders[key] = asyncio.create_task(pump())
