"""Websocket: ``ws/chat/`` (contract §5). The same turns as the SSE views."""

import asyncio
import json
import logging

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from sessions_app.errors import ApiError, NotFound
from sessions_app.resources import auth_required, resolve_resource

from . import events
from .schemas import parse_frame
from .pool import pool
from .turns import Turn, registry, start_turn

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
            self.forward(turn)
        elif frame.type == "interrupt":
            turn = self.own_turns.get(frame.threadId)
            if turn is None or turn.finished:
                turn = registry.get(resolve_resource(user, frame.resourceId), frame.threadId)
            if turn is None or turn.finished:
                raise NotFound(f"no running turn on thread {frame.threadId!r}")
            await turn.interrupt()
        elif frame.type == "follow":
            turn = registry.get(resolve_resource(user, frame.resourceId), frame.threadId)
            if turn is None:
                raise NotFound(f"no running turn on thread {frame.threadId!r}")
            self.forward(turn)

    def forward(self, turn: Turn) -> None:
        key = turn.spec.key
        if (running := self.forwarders.get(key)) and not running.done():
            return  # already streaming this turn to this socket

        async def pump():
            async for event in turn.listen():
                await self.send_json(event)

        self.forwarders[key] = asyncio.create_task(pump())
