"""A Redis outage under two workers (issue 22, item 6): a redis-server of the
module's own (never the shared one) is stopped and started again while a
client on worker B follows a turn running on worker A.

* the follower gets an ``error`` event (``unavailable``, with ``retryAfter``)
  and then its stream ends (SSE) or the socket stays open (websocket), never
  a bare close;
* each worker logs the outage once (one line when the channel layer goes,
  one when it is back), not a traceback per reconnect attempt;
* once Redis is back, following works again;
* per-minute turn limits are counted in the database meanwhile (README:
  reliability), so they still hold across workers.

PostgreSQL: ``TEST_POSTGRES_URL`` (or the run's own ``DATABASE_URL`` when it
is PostgreSQL); ``redis-server`` on the PATH. Without them the module is
skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import ci
from tests.e2e import (PostgresDatabase, ServerPair, WSClient, free_port, new_id, postgres_url, reply,
                       require_postgres)
from tests.helpers import wait_for
from tests.test_scale_out import LEASE_SECONDS, Worker, start_slow_turn, stream_path

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # on PostgreSQL in every run

TURNS_PER_MINUTE = 3
# A turn long enough to stop Redis in the middle of it (2 s of silence, then 3 s of text).
LONG = "Take your time [pause 2] [slow]"


class PrivateRedis:
    """A redis-server of the test's own on a free port, stopped and started at will."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), timeout=10, interval=0.05, message="the private redis-server answers")

    def stop(self) -> None:
        """Gone at once, as a crashed or restarted Redis is: connections drop."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


class RedisCluster(ServerPair):
    def __init__(self, tmp: Path):
        self.redis = PrivateRedis(tmp)
        self.pg = PostgresDatabase(postgres_url(), migrated=True)
        env = {"REDIS_URL": self.redis.url, "OMNI_REDIS_PREFIX": f"omni-test-{uuid.uuid4().hex[:8]}",
               "OMNI_LEASE_SECONDS": str(LEASE_SECONDS), "OMNI_SHUTDOWN_GRACE_SECONDS": "8",
               "OMNI_TURNS_PER_MINUTE": str(TURNS_PER_MINUTE)}
        self.a = Worker(tmp / "worker-a", self.pg.url, env)
        self.b = Worker(tmp / "worker-b", self.pg.url, env)

    def start(self) -> None:
        self.redis.start()
        super().start()

    def cleanup(self) -> None:
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_postgres("Redis outage tests")
    if shutil.which("redis-server") is None:
        message = "the Redis outage test needs redis-server on the PATH"
        if ci():
            pytest.fail(message)
        pytest.skip(message)
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-outage"))
    try:
        cluster.start()
        yield cluster
    finally:
        if cluster.redis.proc is None:
            cluster.redis.start()  # the workers stop with their Redis there, as in production
        cluster.stop()


@contextlib.contextmanager
def redis_down(cluster: RedisCluster):
    cluster.redis.stop()
    try:
        yield
    finally:
        cluster.redis.start()


def outage_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "channel layer" in line.lower()]


def tracebacks(log: str) -> int:
    return log.count("Traceback (most recent call last)")


def healthy(worker) -> bool:
    status, _, body = worker.request("GET", "/api/health", timeout=5)
    return status == 200 and body["checks"]["channelLayer"] == "ok"


async def test_followers_get_an_error_when_redis_goes_and_follow_again_when_it_is_back(cluster):
    resource, thread = new_id("user"), new_id("thread")
    logs_before = {w: len(w.log()) for w in cluster}
    owner = await asyncio.to_thread(start_slow_turn, cluster.a, resource, thread, LONG)
    sse = await asyncio.to_thread(cluster.b.open_sse, stream_path(thread, resource), None)
    assert sse.status == 200 and sse.is_stream
    await asyncio.to_thread(sse.read_until, "session")
    async with await WSClient.connect(cluster.b) as ws:
        await ws.send({"type": "follow", "threadId": thread, "resourceId": resource})
        assert (await ws.recv())["type"] == "session"
        with redis_down(cluster):
            # the websocket follower: an error event, and the socket stays open
            events = await ws.recv_until("error", "done", timeout=15)
            assert events[-1]["type"] == "error", events
            assert events[-1]["code"] == "unavailable" and events[-1]["retryAfter"] >= 1, events[-1]
            assert events[-1]["threadId"] == thread
            # the SSE follower: an error event, then the stream ends
            rest = await asyncio.to_thread(sse.result)
            sse.close()
            assert rest.last["type"] == "error" and rest.last["code"] == "unavailable", rest.describe()
            # a follow meanwhile: refused with the same error, the socket still open
            await ws.send({"type": "follow", "threadId": thread, "resourceId": resource})
            refused = await ws.recv(timeout=15)
            assert refused["type"] == "error" and refused["code"] == "unavailable", refused
            status, _, body = await asyncio.to_thread(cluster.b.request, "GET", stream_path(thread, resource))
            assert status == 503 and body["error"]["code"] == "unavailable", (status, body)
            # the turn itself runs on, on A
            done = (await asyncio.to_thread(owner.result)).assert_ok()
            owner.close()
            assert done.text == reply(LONG)
        # Redis is back: both workers join it again; following works (a new turn, on the same socket)
        for worker in cluster:
            await asyncio.to_thread(wait_for, lambda w=worker: healthy(w), timeout=15, interval=0.2,
                                    message=f"{worker} reaches Redis again")
        again = await asyncio.to_thread(start_slow_turn, cluster.a, resource, thread, "Again [slow]")
        await ws.send({"type": "follow", "threadId": thread, "resourceId": resource})
        followed = await ws.recv_until("done", "error", timeout=30)
        own = (await asyncio.to_thread(again.result)).assert_ok()
        again.close()
        assert followed == own.events
    # the log: the outage once per worker (down, back), no traceback per attempt
    for worker in cluster:
        log = worker.log()[logs_before[worker]:]
        lines = outage_lines(log)
        assert any(re.search(r"unreachable|down|lost", line, re.I) for line in lines), log[-3000:]
        assert any(re.search(r"back|reconnected|again", line, re.I) for line in lines), log[-3000:]
        assert len(lines) <= 4, lines
        assert tracebacks(log) == 0, log[-6000:]


def test_per_minute_limits_hold_across_workers_while_redis_is_down(cluster):
    resource = new_id("user")
    with redis_down(cluster):
        results = [worker.chat("Count me", resource, new_id("thread"))
                   for worker in (cluster.a, cluster.b, cluster.a, cluster.b)]
    started = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    assert len(started) == TURNS_PER_MINUTE and len(refused) == 1, [r.describe() for r in results]
    for result in started:
        result.assert_ok()
    assert refused[0].body["error"]["code"] == "rate_limited"
    assert int(refused[0].headers["retry-after"]) >= 1
