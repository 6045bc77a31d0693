"""What a turn's usage record costs on the warm path (issue 17: at most 2 ms
at p50).

The record is written in the turn's last save, after its reply streamed, so
it cannot move the time to first text; what it can cost is that save's
trip: here the same trip (``chat_app.turns.store._finish_sync``: the
lease's end if still held, the mapping's update, in one transaction) with
and without the record's insert and cost, alternated, on the bench's
database (the embedded file, or ``DATABASE_URL``).
"""

from __future__ import annotations

import statistics
import time
import uuid
from types import SimpleNamespace

SAMPLES = 300


def run():
    from django.utils import timezone

    from chat_app import leases
    from chat_app.turns import store
    from sessions_app.models import SessionMapping

    thread = f"record-{uuid.uuid4().hex[:8]}"
    SessionMapping.objects.create(thread_id=thread, resource_id="bench", session_id=str(uuid.uuid4()))
    spec = SimpleNamespace(thread_id=thread, resource_id="bench")
    timings = {True: [], False: []}
    for i in range(SAMPLES * 2):
        with_record = bool(i % 2)
        lease = leases.acquire_sync("bench", thread, uuid.uuid4().hex)
        record = {"turn_id": uuid.uuid4().hex, "resource_id": "bench", "thread_id": thread, "agent": "smart",
                  "model": "offline", "started_at": timezone.now(), "duration_ms": 40, "first_text_ms": 20,
                  "outcome": "done", "worker": "bench", "input_tokens": 700, "output_tokens": 20,
                  "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.0019} if with_record else None
        started = time.perf_counter()
        store._finish_sync(spec, str(uuid.uuid4()), lease, user_message="hello", agent="smart",
                           assistant_message="hi", turn_record=record, drop_local=False)
        timings[with_record].append((time.perf_counter() - started) * 1000)
    with_p50, without_p50 = statistics.median(timings[True]), statistics.median(timings[False])
    return [
        ("a turn's last save (one trip), without the usage record, p50", without_p50, "ms"),
        ("the same save with the usage record (insert + cost), p50", with_p50, "ms"),
        ("what the record adds, p50", with_p50 - without_p50, "ms"),
    ]
