"""A new thread on a ready spare, step by step (issue 18: the project must
add no more than the lease, the mapping's insert and the first frame to a
connected client's first message).

In this process (the bench's throwaway database), the offline model in a
process of its own: a raw connected client's first message, then the
project's ``start_turn`` on a spare, with where its time went — the checks'
trip (the lease, the thread, the limits), handing the message to the CLI,
the CLI's ``init``, the mapping's insert (the ``session`` event), the first
text. The websocket frame on top is in ``bench pool`` (a live server).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from types import SimpleNamespace

from bench.pool import ModelProcess, _first_text, _ms, raw_options

SAMPLES = int(os.environ.get("BENCH_SPARE_SAMPLES", "9"))


async def raw_first(options: dict) -> float:
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

    client = ClaudeSDKClient(ClaudeAgentOptions(**options))
    await client.connect()
    try:
        await asyncio.sleep(1)
        started, first = time.perf_counter(), None
        await client.query("hello")
        async for message in client.receive_response():
            if first is None and _first_text(message):
                first = time.perf_counter() - started
        return _ms(first)
    finally:
        await client.disconnect()


async def project_first() -> dict:
    from chat_app.pool import pool
    from chat_app.turns import start_turn

    pool.start()  # as the server does at its start (chat_app.lifecycle.startup)
    pool.fill_spares()
    deadline = time.monotonic() + 60
    while not pool.spares.get("smart"):
        if time.monotonic() > deadline:
            raise RuntimeError("no spare became ready")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    body = SimpleNamespace(message="hello", threadId=f"spare-{uuid.uuid4().hex[:8]}", resourceId="bench",
                           agent=None, chunks=False)
    started = time.perf_counter()
    turn = await start_turn(None, body)
    begun = time.perf_counter() - started
    first = None
    async for event in turn.listen():
        if event["type"] == "text" and first is None:
            first = time.perf_counter() - started
    assert turn.events[-1]["type"] == "done", turn.events[-1]
    m = turn.marks
    return {"total": _ms(first), "begin": _ms(begun), "sent": _ms(m["sent"]),
            "init": _ms(m["init"] - m["sent"]), "insert": _ms(m["session"] - m["init"]),
            "text": _ms(m["first_text"] - m["session"])}


async def measure(model_url: str) -> dict:
    from django.conf import settings

    settings.OMNI_OFFLINE_MODEL = False
    settings.OMNI_AUTH = "off"  # the resource as given, as make run serves
    settings.OMNI_SPARE_CLIENTS = 1
    os.environ["ANTHROPIC_BASE_URL"] = model_url
    os.environ.setdefault("ANTHROPIC_API_KEY", "offline-model")
    options = raw_options(model_url)
    raw, project = [], []
    from chat_app.pool import pool

    try:
        for _ in range(SAMPLES):
            raw.append(await raw_first(options))
            project.append(await project_first())
    finally:
        await pool.shutdown()
    return {"raw": raw, "project": project}


def run():
    async def go():
        with ModelProcess() as model:
            return await measure(model.base_url)

    m = asyncio.run(go())
    p50 = statistics.median
    step = {k: p50([p[k] for p in m["project"]]) for k in m["project"][0]}
    raw = p50(m["raw"])
    return [
        ("raw SDK: a connected client's first message, to first text p50", raw, "ms"),
        ("project, in process: new thread on a spare, to first text p50", step["total"], "ms"),
        ("  the checks' trip (lease, thread, budget, limits)", step["begin"], "ms"),
        ("  then the message handed to the spare's CLI", step["sent"], "ms"),
        ("  the CLI's init (its own work)", step["init"], "ms"),
        ("  the mapping's insert, then the session event", step["insert"], "ms"),
        ("  the session event to the first text (the CLI and the model)", step["text"], "ms"),
        ("project vs raw (in process)", step["total"] / raw, "x"),
    ]
