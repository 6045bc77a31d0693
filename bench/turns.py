"""Chat turns through the real SDK and CLI against the offline model.

Measures the turn pipeline as a client sees it: time from starting a turn
to its ``session`` event and to its first ``text`` event, and the whole turn,
for a new thread and for follow-ups that resume it (median of N). Each turn
today starts a CLI process of its own, so these are the baseline for the
warm-client pool (target: ~20 ms to the first token for follow-ups).
"""

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings

from chat_app.turns import start_turn

FOLLOW_UPS = 5


async def timed_turn(thread_id: str, message: str) -> dict:
    body = SimpleNamespace(message=message, threadId=thread_id, resourceId="bench", agent=None)
    started = time.perf_counter()
    turn = await start_turn(None, body)
    marks = {}
    async for event in turn.listen():
        marks.setdefault(event["type"], time.perf_counter() - started)
    if "done" not in marks:
        raise RuntimeError(f"turn failed: {turn.events[-1]}")
    return marks


async def measure() -> list[tuple[str, float, str]]:
    from chat_app.pool import pool

    pool.start()  # as the server does at its start (chat_app.lifecycle.startup)
    thread = f"bench-{uuid.uuid4().hex[:8]}"
    first = await timed_turn(thread, "What is 2+2?")
    follow = [await timed_turn(thread, f"Follow-up {i}") for i in range(FOLLOW_UPS)]

    def median(key):
        return statistics.median(m[key] for m in follow) * 1000

    return [
        ("new thread: to first text", first["text"] * 1000, "ms"),
        ("new thread: whole turn", first["done"] * 1000, "ms"),
        (f"follow-up: to session event (median of {FOLLOW_UPS})", median("session"), "ms"),
        (f"follow-up: to first text (median of {FOLLOW_UPS})", median("text"), "ms"),
        (f"follow-up: whole turn (median of {FOLLOW_UPS})", median("done"), "ms"),
    ]


def run():
    work = Path(tempfile.mkdtemp(prefix="omni-bench-turns-"))
    settings.OMNI_AUTH = "off"
    settings.OMNI_OFFLINE_MODEL = True
    settings.CLAUDE_CONFIG_DIR = work / "claude"
    settings.OMNI_WORKSPACE_DIR = work / "workspace"
    return asyncio.run(measure())
