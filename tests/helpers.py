"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

JSON = "application/json"


def turn_body(message, thread, resource, agent=None, **extra) -> SimpleNamespace:
    """What a client sends to start a turn (``start_turn``'s second argument)."""
    return SimpleNamespace(message=message, threadId=thread, resourceId=resource, agent=agent, **extra)


def turn_bodies(resource: str, thread: str | None = None):
    """A module's ``body(message, thread, resource, agent=None, **extra)``:
    ``turn_body`` with this module's resource (and default thread)."""

    def body(message, thread=thread, resource=resource, agent=None, **extra) -> SimpleNamespace:
        assert thread is not None, "body() needs a thread"
        return turn_body(message, thread, resource, agent, **extra)

    return body


async def collect(stream) -> list:
    """Every item of an async iterable (a turn's or a follow's events)."""
    return [item async for item in stream]


async def events_of(turn) -> list[dict]:
    """A turn's events, from the first to the last."""
    return await collect(turn.listen())


def save(thread_id, resource_id="alice", session_id=None, **kwargs):
    """``services.save_session`` from sync code; a new session id unless given."""
    from asgiref.sync import async_to_sync

    from sessions_app import services

    return async_to_sync(services.save_session)(
        thread_id, resource_id, session_id or str(uuid.uuid4()), **kwargs)


def json_of(response) -> dict:
    """The JSON body of a Django test response (which must say it is JSON)."""
    assert response["Content-Type"].startswith(JSON), response["Content-Type"]
    return json.loads(response.content)


def error_of(response, status: int) -> dict:
    """The contract's JSON error of a Django test response: ``{"code", "message"}``."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    data = json_of(response)
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
    error = data["error"]
    assert isinstance(error["code"], str) and error["code"], data
    assert isinstance(error["message"], str) and error["message"], data
    return error


def anthropic_sse(raw: str) -> list[tuple[str, dict]]:
    """``[(event name, data), ...]`` of a Messages API SSE body."""
    events = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events
