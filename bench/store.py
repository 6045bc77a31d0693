"""Benchmarks of ``sessions_app.transcripts.DjangoSessionStore``.

* append: 20 batches of 500 entries into one session (the SDK's largest
  batch), entries per second;
* load of that 10,000-entry session, ms (median of 5);
* list_sessions / list_session_summaries of a project of 1,000 sessions with
  100,000 transcript rows in the table, ms (median of 20); the 90,000 extra
  rows are written as 1,000 appends of 90 entries (a turn-sized batch).

Entries look like the CLI's (~0.8 kB of JSON each). Rows are written under
project keys of their own and deleted at the end.
"""

import asyncio
import statistics
import time
import uuid

from asgiref.sync import sync_to_async
from django.db import connections

from sessions_app.models import TranscriptEntry, TranscriptSummary
from sessions_app.transcripts import DjangoSessionStore

BATCHES, BATCH_SIZE = 20, 500
SESSIONS, SESSION_ROWS = 1000, 90
TEXT = ("The quick brown fox jumps over the lazy dog while the metrics dashboard "
        "shows a steady p99 latency; ") * 4


def entry(session_id: str, i: int) -> dict:
    kind = "user" if i % 2 == 0 else "assistant"
    return {
        "parentUuid": str(uuid.uuid4()),
        "isSidechain": False,
        "type": kind,
        "message": {"role": kind, "content": [{"type": "text", "text": f"{i}: {TEXT}"}]}
        if kind == "assistant" else {"role": "user", "content": f"{i}: {TEXT[:120]}"},
        "uuid": str(uuid.uuid4()),
        "timestamp": "2026-01-01T00:00:00.000Z",
        "userType": "external",
        "cwd": "/srv/omni/workspace",
        "sessionId": session_id,
        "version": "2.1.0",
        "gitBranch": "main",
    }


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def bench(prefix: str) -> list[tuple[str, float, str]]:
    store = DjangoSessionStore()
    results = []

    # --- append: 20 x 500 into one session
    session_id = str(uuid.uuid4())
    key = {"project_key": f"{prefix}-big", "session_id": session_id}
    batches = [[entry(session_id, b * BATCH_SIZE + i) for i in range(BATCH_SIZE)]
               for b in range(BATCHES)]
    times = []
    for batch in batches:
        started = time.perf_counter()
        await store.append(key, batch)
        times.append(time.perf_counter() - started)
    results.append((f"append {BATCHES}x{BATCH_SIZE} entries", BATCHES * BATCH_SIZE / sum(times),
                    "entries/s"))
    results.append((f"append one {BATCH_SIZE}-entry batch (median)", median_ms(times), "ms"))

    # A retried batch: every line already there.
    started = time.perf_counter()
    await store.append(key, batches[-1])
    results.append((f"append a retried {BATCH_SIZE}-entry batch", (time.perf_counter() - started)
                    * 1000, "ms"))

    del batches, batch  # the writer's copies: not part of what load costs

    # --- load the 10,000-entry session
    times = []
    for _ in range(5):
        started = time.perf_counter()
        loaded = await store.load(key)
        times.append(time.perf_counter() - started)
    assert len(loaded) == BATCHES * BATCH_SIZE
    results.append((f"load a {len(loaded):,}-entry session (median)", median_ms(times), "ms"))

    # --- list_sessions with 100,000 rows present
    project = f"{prefix}-many"
    started = time.perf_counter()
    for s in range(SESSIONS):
        sid = str(uuid.uuid4())
        await store.append({"project_key": project, "session_id": sid},
                           [entry(sid, i) for i in range(SESSION_ROWS)])
    elapsed = time.perf_counter() - started
    results.append((f"append {SESSIONS}x{SESSION_ROWS} entries (new sessions)",
                    SESSIONS * SESSION_ROWS / elapsed, "entries/s"))
    rows = await sync_to_async(TranscriptEntry.objects.count)()
    for name, call in (("list_sessions", store.list_sessions),
                       ("list_session_summaries", store.list_session_summaries)):
        times = []
        for _ in range(20):
            started = time.perf_counter()
            listed = await call(project)
            times.append(time.perf_counter() - started)
        assert len(listed) == SESSIONS
        results.append((f"{name}: {SESSIONS:,} sessions, {rows:,} rows (median)",
                        median_ms(times), "ms"))
    return results


def cleanup(prefix: str) -> None:
    TranscriptEntry.objects.filter(project_key__startswith=prefix).delete()
    TranscriptSummary.objects.filter(project_key__startswith=prefix).delete()
    connections.close_all()


def run() -> list[tuple[str, float, str]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"

    async def main():
        try:
            return await bench(prefix)
        finally:
            await sync_to_async(cleanup, thread_sensitive=True)(prefix)

    return asyncio.run(main())
