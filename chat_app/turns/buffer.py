"""A turn's events: numbered, kept, and handed to every listener.

Every event of a turn carries ``seq`` (its 0-based position in the turn),
``turnId`` and ``threadId`` (contract §5). The log keeps them in order for
as long as the turn (and its linger) lives; any number of listeners read
them from any position (the transport that started the turn, a ``follow``
on this worker), and ``on_event`` hooks get each new one as it is added
(the streams hub, which sends them to followers on other workers).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

TERMINAL = ("done", "error")


class EventLog:
    def __init__(self, turn_id: str, thread_id: str):
        self.turn_id = turn_id
        self.thread_id = thread_id
        self.events: list[dict] = []
        self._texts: list[str | None] = []  # each event's JSON, made once, when first read
        self.finished = False
        self._wake = asyncio.Event()
        self.on_event: list[Callable[[dict], None]] = []

    def append(self, event: dict, *, last: bool = False) -> dict:
        """Number ``event``, name its turn and thread, keep it and wake the
        listeners. ``last``: the turn's final event (``done`` or ``error``)."""
        if self.finished:
            raise RuntimeError(f"turn {self.turn_id} has ended; {event.get('type')} not added")
        event["seq"] = len(self.events)
        event["turnId"] = self.turn_id
        event.setdefault("threadId", self.thread_id)
        self.events.append(event)
        self._texts.append(None)
        if last:
            self.finished = True
        self._wake.set()
        self._wake = asyncio.Event()
        for hook in self.on_event:
            hook(event)
        return event

    def text(self, index: int) -> str:
        """Event ``index`` as JSON: serialized once, however many listeners
        and transports read it (and not at all if nobody does)."""
        text = self._texts[index]
        if text is None:
            text = self._texts[index] = json.dumps(self.events[index])
        return text

    async def listen_json(self, start: int = 0) -> AsyncIterator[tuple[dict, str]]:
        """As :meth:`listen`, each event with its JSON."""
        index = max(start, 0)
        while True:
            wake = self._wake
            while index < len(self.events):
                yield self.events[index], self.text(index)
                index += 1
            if self.finished:
                return
            await wake.wait()

    async def listen(self, start: int = 0) -> AsyncIterator[dict]:
        """Every event from ``start`` on, as they come, until the last one."""
        index = max(start, 0)
        while True:
            wake = self._wake
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                return
            await wake.wait()
