"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
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


# --- waiting on a condition ------------------------------------------------------------
# A test waits for what it needs to have happened, never for a fixed time: on a
# loaded machine (2 cores, several suites at once) anything can take longer.

WAIT_SECONDS = 30.0


def _failure(message, timeout: float, last) -> str:
    said = message() if callable(message) else message
    return f"not within {timeout} s: {said or 'the condition'} (last seen: {last!r})"


def wait_for(predicate, timeout: float = WAIT_SECONDS, interval: float = 0.05, message=None):
    """Call ``predicate()`` until it returns something truthy, and return that;
    fail the test (AssertionError) if it has not within ``timeout`` seconds.
    ``message`` (a string, or a function returning one) says what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_failure(message, timeout, value))
        time.sleep(interval)


async def wait_for_async(predicate, timeout: float = WAIT_SECONDS, interval: float = 0.05, message=None):
    """``wait_for`` on the running event loop: ``predicate`` may be a plain
    function or return an awaitable (a coroutine function's call)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(_failure(message, timeout, value))
        await asyncio.sleep(interval)


def cli_processes() -> list[int]:
    """The CLI processes this (test) process started and that still run."""
    from tests.e2e import _ppid, is_cli

    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and _ppid(int(p)) == os.getpid() and is_cli(int(p))]
