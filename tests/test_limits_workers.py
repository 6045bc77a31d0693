"""The turn limits across two live daphne workers (chat_app/limits/): what
one resource may do is counted once for the service, not once per worker.

Both workers run with ``OMNI_TURNS_PER_MINUTE=4``,
``OMNI_MAX_TURNS_PER_RESOURCE=2``, ``OMNI_BUSY_RETRY_AFTER=3`` and one Claude
process each (``OMNI_MAX_PROCESSES=1``, so a worker with a turn running
answers another resource's turn with 503 ``server_busy``). Each test uses
resources of its own (its counts are its own) and runs against two pairs of
workers, one per backend:

* ``database``: no ``REDIS_URL``; the workers share one database (a libSQL
  file both open, or, when the test run is on PostgreSQL, a fresh PostgreSQL
  database), where the starts are counted.
* ``redis``: one fresh PostgreSQL database and one Redis (a key prefix of
  its own), where the starts are counted. Needs both: skipped without them,
  failed under ``CI=true``; run once (not again in the PostgreSQL run).

Within a minute, so the window never slides here (tests/test_limits.py
checks the sliding window and the Retry-After values with a clock of its own).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e import PostgresDatabase, ServerPair, new_id, postgres_url, reply, run_database
from tests.test_scale_out import Worker, delete_redis_keys, redis_url, require_services, start_slow_turn

pytestmark = [pytest.mark.e2e]

PER_MINUTE = 4
AT_ONCE = 2
BUSY_RETRY_AFTER = 3
LIMITS = {
    "OMNI_TURNS_PER_MINUTE": str(PER_MINUTE),
    "OMNI_MAX_TURNS_PER_RESOURCE": str(AT_ONCE),
    "OMNI_BUSY_RETRY_AFTER": str(BUSY_RETRY_AFTER),
    "OMNI_MAX_PROCESSES": "1",
}


class DatabasePair(ServerPair):
    """No Redis: the workers share the database, and count there."""

    def __init__(self, tmp: Path):
        self.pg = run_database()
        url = self.pg.url if self.pg else f"file:{tmp / 'shared.db'}"
        self.a = Worker(tmp / "worker-a", url, LIMITS)
        self.b = Worker(tmp / "worker-b", url, LIMITS)


class RedisPair(ServerPair):
    """PostgreSQL and Redis shared: the starts are counted in Redis."""

    def __init__(self, tmp: Path):
        self.pg = PostgresDatabase(postgres_url(), migrated=True)
        self.prefix = f"omni-test-{uuid.uuid4().hex[:8]}"
        env = {**LIMITS, "REDIS_URL": redis_url(), "OMNI_REDIS_PREFIX": self.prefix}
        self.a = Worker(tmp / "worker-a", self.pg.url, env)
        self.b = Worker(tmp / "worker-b", self.pg.url, env)

    def cleanup(self) -> None:
        delete_redis_keys(self.prefix)


@pytest.fixture(scope="module", params=[
    "database", pytest.param("redis", marks=pytest.mark.engine_agnostic)])
def pair(request, tmp_path_factory):
    if request.param == "redis":
        require_services()
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}")
    pair = (RedisPair if request.param == "redis" else DatabasePair)(tmp)
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


def assert_rate_limited(result, says: str, retry_after: range | int) -> None:
    assert result.status == 429, result.describe()
    assert result.body["error"]["code"] == "rate_limited", result.body
    assert says in result.body["error"]["message"], result.body
    waited = int(result.headers["retry-after"])
    assert waited == retry_after if isinstance(retry_after, int) else waited in retry_after


def test_turns_per_minute_are_counted_across_workers(pair):
    """Four turns, two on each worker, use up the resource's minute: the
    fifth is refused on either worker (each alone has seen only two)."""
    resource = new_id("rate")
    threads = {pair.a: new_id("thread"), pair.b: new_id("thread")}
    for n, worker in enumerate((pair.a, pair.b, pair.a, pair.b)):
        worker.chat(f"turn {n}", resource, threads[worker]).assert_ok()
    for worker in (pair.a, pair.b):
        assert_rate_limited(worker.chat("one more", resource, new_id("thread")),
                            f"started {PER_MINUTE} turns in the last minute", range(1, 61))
    # another resource is not affected
    pair.b.chat("someone else", new_id("rate"), new_id("thread")).assert_ok()


def test_running_turns_are_counted_across_workers(pair):
    """A slow turn on each worker: the resource runs two, its limit, so a
    third is refused on either worker with OMNI_BUSY_RETRY_AFTER; those
    refused starts do not count against its minute."""
    resource = new_id("busy")
    slow = [start_slow_turn(worker, resource, new_id("thread")) for worker in (pair.a, pair.b)]
    try:
        for worker in (pair.a, pair.b):
            assert_rate_limited(worker.chat("a third at once", resource, new_id("thread")),
                                f"already runs {AT_ONCE} turns", BUSY_RETRY_AFTER)
        for stream in slow:
            assert stream.result().assert_ok().text == reply("Count slowly [slow]")
    finally:
        for stream in slow:
            stream.close()
    # two started, two refused: two more may start this minute, then no more
    thread = new_id("thread")
    pair.b.chat("after them", resource, thread).assert_ok()
    pair.a.chat("and again", resource, thread).assert_ok()
    assert_rate_limited(pair.b.chat("too many", resource, thread),
                        f"started {PER_MINUTE} turns in the last minute", range(1, 61))


def test_a_turn_refused_with_server_busy_does_not_use_up_the_quota(pair):
    """Worker A's one Claude process runs another resource's slow turn:
    A answers this resource 503 server_busy, more times than its minute
    allows turns; then all four of its turns still start."""
    holder = start_slow_turn(pair.a, new_id("holder"), new_id("thread"))
    resource, thread = new_id("refused"), new_id("thread")
    try:
        for n in range(PER_MINUTE + 2):
            refused = pair.a.chat(f"try {n}", resource, thread)
            assert refused.status == 503, refused.describe()
            assert refused.body["error"]["code"] == "server_busy"
            assert int(refused.headers["retry-after"]) >= 1
        holder.result().assert_ok()
    finally:
        holder.close()
    for n, worker in enumerate((pair.a, pair.b, pair.a, pair.b)):
        worker.chat(f"turn {n}", resource, thread).assert_ok()
    assert_rate_limited(pair.a.chat("a fifth", resource, thread),
                        f"started {PER_MINUTE} turns in the last minute", range(1, 61))


async def test_a_daily_budget_is_counted_across_workers(pair):
    """A resource's own budget (set as the admin sets it, while both workers
    run) below one turn's cost: after one turn on A, both workers refuse it
    at once, on SSE and on the
    websocket, with Retry-After until the next UTC midnight."""
    import asyncio
    import subprocess
    import time as clock
    from datetime import UTC, datetime, timedelta

    from tests.e2e import ROOT, WSClient, python_bin

    resource = new_id("spender")
    code = ("from sessions_app.models import ResourceBudget; "
            f"ResourceBudget.objects.create(resource_id={resource!r}, daily_usd='0.0001')")
    done = subprocess.run([python_bin(), "manage.py", "shell", "-c", code], cwd=ROOT, env=pair.a.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # No worker caches overrides (issue 21): the one just saved applies at once, on both.
    first = await asyncio.to_thread(pair.a.chat, "spend", resource, new_id("thread"))
    first.assert_ok()
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    left = (midnight - now).total_seconds()
    for worker in (pair.a, pair.b):
        refused = await asyncio.to_thread(worker.chat, "more", resource, new_id("thread"))
        assert refused.status == 429 and refused.body["error"]["code"] == "budget_exceeded", refused.describe()
        assert abs(int(refused.headers["retry-after"]) - left) < 5
        async with await WSClient.connect(worker) as ws:
            await ws.send({"type": "message", "message": "more", "threadId": new_id("thread"),
                           "resourceId": resource})
            event = await ws.recv(timeout=20)
        assert event["type"] == "error" and event["code"] == "budget_exceeded"
        assert abs(event["retryAfter"] - left) < 5
    started = clock.monotonic()
    status, _, data = await asyncio.to_thread(pair.b.request, "GET", f"/api/usage?resourceId={resource}")
    assert status == 200 and data["total"]["turns"] == 1 and data["budget"]["dailyUsd"] == 0.0001
    assert data["budget"]["spentTodayUsd"] >= 0.0001 and clock.monotonic() - started < 5  # expected ~50 ms
