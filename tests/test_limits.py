"""The turn limits (chat_app/limits/) in this process, on both backends:
counting, the sliding minute, Retry-After, cancel, refused starts not
counted, the running-turn count from the leases, statements per admit, and
(database) exactness with many admits racing on their own connections.

The Redis tests need a Redis (``TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``): skipped without one, failed under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.utils import timezone

from chat_app import limits
from chat_app.limits import DatabaseBackend, RedisBackend
from chat_app.models import ThreadLease, TurnStart
from sessions_app.errors import RateLimited
from tests.conftest import ci

T0 = 1_800_000_000.0  # a fake Unix time (seconds)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def lease(resource: str, thread: str, live: bool = True) -> None:
    """A thread lease as a running (or an ended) turn leaves it."""
    ThreadLease.objects.create(
        resource_id=resource, thread_id=thread,
        expires_at=timezone.now() + timedelta(seconds=30 if live else -1))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def rate(settings):
    """OMNI_TURNS_PER_MINUTE=3 and no running-turn limit (each test sets its own)."""
    settings.OMNI_TURNS_PER_MINUTE = 3
    settings.OMNI_MAX_TURNS_PER_RESOURCE = 0
    return settings


# --- the database backend ---------------------------------------------------------------

db = pytest.mark.django_db(transaction=True)


@db
def test_db_counts_starts_in_a_sliding_minute_with_retry_after(rate, clock):
    backend = DatabaseBackend(clock=clock)
    for n in range(3):
        assert backend.admit_sync("alice", f"t{n}").counted
        clock.now += 10  # starts at 0, 10, 20 s
    with pytest.raises(RateLimited) as refused:  # at 30 s
        backend.admit_sync("alice", "t3")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after == 30  # the start at 0 s is a minute old at 60 s
    assert "started 3 turns in the last minute" in refused.value.message
    assert "30 s" in refused.value.message
    backend.admit_sync("bob", "b0")  # per resource
    clock.now = T0 + 59.5
    with pytest.raises(RateLimited) as refused:
        backend.admit_sync("alice", "t4")
    assert refused.value.retry_after == 1  # rounded up, never 0
    clock.now = T0 + 60  # exactly a minute after the first: it no longer counts
    assert backend.admit_sync("alice", "t5").counted
    with pytest.raises(RateLimited) as refused:
        backend.admit_sync("alice", "t6")
    assert refused.value.retry_after == 10  # now the start at 10 s is the oldest
    # a slot is reused: never more rows than the limit for a resource
    assert TurnStart.objects.filter(resource_id="alice").count() == 3


@db
def test_db_a_refused_start_is_not_counted(rate, clock):
    rate.OMNI_TURNS_PER_MINUTE = 2
    backend = DatabaseBackend(clock=clock)
    backend.admit_sync("alice", "a")        # 0 s
    clock.now += 30
    backend.admit_sync("alice", "b")        # 30 s
    for _ in range(5):                      # 40 s: five refused attempts
        clock.now += 2
        with pytest.raises(RateLimited):
            backend.admit_sync("alice", "refused")
    assert not TurnStart.objects.filter(turn_id="refused").exists()
    clock.now = T0 + 60                     # "a" ages out: exactly one start is free
    backend.admit_sync("alice", "c")
    with pytest.raises(RateLimited) as refused:
        backend.admit_sync("alice", "d")
    assert refused.value.retry_after == 30  # "b" (30 s) is the oldest, not a refused one


@db
async def test_db_cancel_gives_the_start_back(rate, clock):
    rate.OMNI_TURNS_PER_MINUTE = 1
    backend = DatabaseBackend(clock=clock)
    first = await backend.admit("alice", "busy-turn")
    with pytest.raises(RateLimited):
        await backend.admit("alice", "next")
    await first.cancel()  # it met server_busy: it never started
    assert await TurnStart.objects.acount() == 0
    second = await backend.admit("alice", "next")
    await first.cancel()  # twice: nothing more
    assert await TurnStart.objects.filter(turn_id="next").aexists()
    # a late cancel never uncounts another turn's start in the same slot
    clock.now += 61
    third = await backend.admit("alice", "third")
    assert third.token == second.token
    await second.cancel()
    assert await TurnStart.objects.filter(turn_id="third").aexists()


@db
async def test_db_admit_through_the_module_uses_the_database_without_redis(rate, settings):
    settings.REDIS_URL = None
    rate.OMNI_TURNS_PER_MINUTE = 2
    assert isinstance(limits.backend(), DatabaseBackend)
    admitted = [await limits.admit("alice", f"t{n}") for n in range(2)]
    with pytest.raises(RateLimited) as refused:
        await limits.admit("alice", "t2")
    assert 59 <= refused.value.retry_after <= 60
    await admitted[0].cancel()
    await limits.admit("alice", "t2")


@db
def test_db_running_turns_are_the_live_leases_of_every_worker(rate, clock):
    rate.OMNI_TURNS_PER_MINUTE = 10
    rate.OMNI_MAX_TURNS_PER_RESOURCE = 2
    rate.OMNI_BUSY_RETRY_AFTER = 7
    backend = DatabaseBackend(clock=clock)
    lease("alice", "t1")
    lease("alice", "t2")  # the calling turn's own lease: 2 running, the limit
    lease("alice", "ended", live=False)
    lease("bob", "t1")
    lease("bob", "t2")
    lease("bob", "t3")
    assert backend.admit_sync("alice", "t2").counted
    lease("alice", "t3")  # a third turn took its lease: 3 > 2
    with pytest.raises(RateLimited) as refused:
        backend.admit_sync("alice", "t3")
    assert refused.value.retry_after == 7
    assert "already runs 2 turns" in refused.value.message
    assert list(TurnStart.objects.values_list("turn_id", flat=True)) == ["t2"]  # not counted
    # with the rate off, only the leases are counted
    rate.OMNI_TURNS_PER_MINUTE = 0
    with pytest.raises(RateLimited):
        backend.admit_sync("alice", "t3")
    ThreadLease.objects.filter(thread_id="t1").update(expires_at=timezone.now())  # t1 ended
    assert backend.admit_sync("alice", "t3").counted is False
    rate.OMNI_MAX_TURNS_PER_RESOURCE = 0  # both off: anything goes
    lease("alice", "t4")
    backend.admit_sync("alice", "t4")


@db
def test_db_a_lowered_limit_counts_every_start_of_the_minute(rate, clock):
    """Starts counted under a higher limit (slots beyond the new one) still
    count after the limit is lowered; a raised one adds slots at once."""
    rate.OMNI_TURNS_PER_MINUTE = 5
    backend = DatabaseBackend(clock=clock)
    for n in range(5):
        backend.admit_sync("alice", f"t{n}")
        clock.now += 1
    rate.OMNI_TURNS_PER_MINUTE = 3
    with pytest.raises(RateLimited) as refused:
        backend.admit_sync("alice", "t5")
    assert refused.value.retry_after == 55 and "started 3 turns" in refused.value.message
    rate.OMNI_TURNS_PER_MINUTE = 1000
    assert backend.admit_sync("alice", "t5").token not in range(5)


@db
def test_db_statements_per_admit_and_cancel(rate, clock, django_assert_num_queries):
    backend = DatabaseBackend(clock=clock)
    with django_assert_num_queries(2):  # the upsert, and the first prune of this process
        backend.admit_sync("alice", "t0")
    with django_assert_num_queries(1):  # warm: one statement
        admission = backend.admit_sync("alice", "t1")
    rate.OMNI_MAX_TURNS_PER_RESOURCE = 4
    with django_assert_num_queries(1):  # the lease count is in the same statement
        backend.admit_sync("alice", "t2")
    with django_assert_num_queries(2), pytest.raises(RateLimited):  # refused: upsert + counts
        backend.admit_sync("alice", "t3")
    with django_assert_num_queries(1):
        uncount_here(admission)
    rate.OMNI_TURNS_PER_MINUTE = 0
    with django_assert_num_queries(1):  # only the lease count
        backend.admit_sync("alice", "t4")
    rate.OMNI_MAX_TURNS_PER_RESOURCE = 0
    with django_assert_num_queries(0):
        backend.admit_sync("alice", "t5")


def uncount_here(admission) -> None:
    """Admission.cancel's database work, on this thread (the test's connection)."""
    admission.backend.uncount_sync(admission)


@db
def test_db_old_starts_are_pruned_once_a_minute(rate, clock):
    backend = DatabaseBackend(clock=clock)
    for n in range(3):
        backend.admit_sync(f"user{n}", "t")
    clock.now += 59
    backend.admit_sync("other", "t")  # the first prune was at T0: not again yet
    assert TurnStart.objects.count() == 4
    clock.now += 2  # a minute after the last prune; the first three are over a minute old
    backend.admit_sync("other", "t2")
    assert sorted(TurnStart.objects.values_list("resource_id", "turn_id")) == [
        ("other", "t"), ("other", "t2")]


@db
def test_db_racing_admits_on_their_own_connections_count_exactly(rate):
    """Sixteen threads, each with its own database connection (a worker
    each), start 4 turns each on one resource at once: exactly the limit
    is admitted, the rest refused with 429 (on PostgreSQL this is the race
    the conditional upsert is for)."""
    rate.OMNI_TURNS_PER_MINUTE = 10
    backend = DatabaseBackend()
    barrier = threading.Barrier(16)
    admitted, refused, failed = [], [], []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for k in range(4):
                try:
                    admitted.append(backend.admit_sync("alice", f"w{n}-{k}"))
                except RateLimited as exc:
                    refused.append(exc)
        except Exception as exc:  # noqa: BLE001
            failed.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failed, failed
    assert len(admitted) == 10 and len(refused) == 54
    assert sorted(a.token for a in admitted) == list(range(10))
    assert TurnStart.objects.filter(resource_id="alice").count() == 10
    assert {e.message.split(";")[0] for e in refused} == {
        "resource 'alice' started 10 turns in the last minute"}
    print(f"{connection.vendor}: {backend.lost_races} upserts lost a slot to another and retried")


# --- the Redis backend ------------------------------------------------------------------

def redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_backend(rate, clock):
    """A Redis backend with a key prefix of its own (removed after the test)."""
    import redis

    try:
        redis.Redis.from_url(redis_url(), socket_connect_timeout=3).ping()
    except Exception as exc:
        if ci():
            pytest.fail(f"the Redis limit tests need Redis at {redis_url()}: {exc}")
        pytest.skip(f"no Redis at {redis_url()}: {exc}")
    prefix = f"omni-test-limits-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(redis_url(), prefix, clock=clock)
    yield backend
    sync = redis.Redis.from_url(redis_url())
    keys = list(sync.scan_iter(match=f"{prefix}*"))
    if keys:
        sync.delete(*keys)


@pytest.fixture
async def redis_async(redis_backend):
    yield redis_backend
    await redis_backend.aclose()


def members(backend: RedisBackend, resource: str) -> list[str]:
    import redis

    return [m.decode() for m in redis.Redis.from_url(redis_url()).zrange(backend.key(resource), 0, -1)]


async def test_redis_counts_starts_in_a_sliding_minute_with_retry_after(redis_async, clock):
    backend = redis_async
    for n in range(3):
        assert (await backend.admit("alice", f"t{n}")).counted
        clock.now += 10
    with pytest.raises(RateLimited) as refused:  # at 30 s
        await backend.admit("alice", "t3")
    assert refused.value.retry_after == 30 and "started 3 turns in the last minute" in refused.value.message
    await backend.admit("bob", "b0")  # per resource
    clock.now = T0 + 59.5
    with pytest.raises(RateLimited) as refused:
        await backend.admit("alice", "t4")
    assert refused.value.retry_after == 1
    clock.now = T0 + 60
    await backend.admit("alice", "t5")
    with pytest.raises(RateLimited) as refused:
        await backend.admit("alice", "t6")
    assert refused.value.retry_after == 10
    assert members(backend, "alice") == ["t1", "t2", "t5"]  # refused ones never entered
    import redis

    ttl = redis.Redis.from_url(redis_url()).pttl(backend.key("alice"))
    assert 0 < ttl <= 60_000  # an idle resource's key goes away


async def test_redis_cancel_gives_the_start_back_and_a_turn_counts_once(redis_async, rate):
    rate.OMNI_TURNS_PER_MINUTE = 1
    backend = redis_async
    first = await backend.admit("alice", "busy-turn")
    again = await backend.admit("alice", "busy-turn")  # a retried call: still one start
    assert again.counted and members(backend, "alice") == ["busy-turn"]
    with pytest.raises(RateLimited):
        await backend.admit("alice", "next")
    await first.cancel()
    assert members(backend, "alice") == []
    await backend.admit("alice", "next")
    await first.cancel()  # twice: nothing more
    assert members(backend, "alice") == ["next"]


@db
async def test_redis_running_turns_come_from_the_leases(redis_async, rate):
    rate.OMNI_MAX_TURNS_PER_RESOURCE = 1
    backend = redis_async
    await sync_to_async(lease)("alice", "t1")
    await backend.admit("alice", "t1")  # its own lease: 1 running
    await sync_to_async(lease)("alice", "t2")
    with pytest.raises(RateLimited) as refused:
        await backend.admit("alice", "t2")
    assert "already runs 1 turns" in refused.value.message
    assert members(backend, "alice") == ["t1"]  # the refused start was taken back out


@db
async def test_redis_down_counts_starts_in_the_database_with_one_warning(rate, clock, caplog):
    """README (reliability): while Redis does not answer, the limit still holds,
    counted in the database (exact across workers); Redis is not tried again
    per turn, and the outage is one warning line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", "omni-test", clock=clock)
    logger = logging.getLogger("omni.chat")
    logger.addHandler(caplog.handler)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        admission = await backend.admit("alice", "t0")
        assert admission.counted and loop.time() - started < 3  # expected ~10 ms: connection refused
        await admission.cancel()  # given back, in the database
        assert await TurnStart.objects.filter(resource_id="alice").acount() == 0
        for n in range(3):  # meanwhile Redis is not tried again: no wait per turn
            assert (await backend.admit("alice", f"t{n + 1}")).counted
        with pytest.raises(RateLimited) as refused:
            await backend.admit("alice", "t4")  # over the rate (3), as with Redis
        assert refused.value.retry_after >= 1
        assert loop.time() - started < 3
        assert await TurnStart.objects.filter(resource_id="alice").acount() == 3
    finally:
        logger.removeHandler(caplog.handler)
        await backend.aclose()
    warnings = [r for r in caplog.records if "Redis failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_redis_a_client_per_event_loop(redis_backend):
    """Each event loop gets a client of its own (a client is bound to its
    loop); a closed loop's client is dropped."""
    backend = redis_backend

    async def one(turn: str):
        admission = await backend.admit("alice", turn)
        return admission, asyncio.get_running_loop()

    first, loop1 = asyncio.run(one("a"))
    second, loop2 = asyncio.run(one("b"))  # a new loop: would fail on loop1's client
    assert first.counted and second.counted
    assert list(backend._clients) == [loop2]
    asyncio.run(second.cancel())
    assert members(backend, "alice") == ["a"]


def test_the_backend_follows_redis_url(settings):
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    settings.OMNI_REDIS_PREFIX = "deploy-a"
    chosen = limits.backend()
    assert isinstance(chosen, RedisBackend) and chosen.key("alice") == "deploy-a:limits:starts:alice"
    assert limits.backend() is chosen
    settings.REDIS_URL = None
    assert isinstance(limits.backend(), DatabaseBackend)


# --- the database backend over a libSQL server (Hrana) ----------------------------------

REMOTE_SCRIPT = """
import asyncio
from datetime import timedelta
from django.conf import settings
from django.utils import timezone
from chat_app.limits import DatabaseBackend
from chat_app.models import ThreadLease, TurnStart
from sessions_app.errors import RateLimited

settings.OMNI_TURNS_PER_MINUTE, settings.OMNI_MAX_TURNS_PER_RESOURCE = 2, 1
now = [1_800_000_000.0]
backend = DatabaseBackend(clock=lambda: now[0])
ThreadLease.objects.create(resource_id="alice", thread_id="t1",
                           expires_at=timezone.now() + timedelta(seconds=30))
first = backend.admit_sync("alice", "t1")
second = backend.admit_sync("alice", "t2")
try:
    backend.admit_sync("alice", "t3")
except RateLimited as exc:
    print("RATE", exc.retry_after)
ThreadLease.objects.create(resource_id="alice", thread_id="t4",
                           expires_at=timezone.now() + timedelta(seconds=30))
try:
    backend.admit_sync("alice", "t4")
except RateLimited as exc:
    print("RUNNING", exc.retry_after)
backend.uncount_sync(second)
now[0] += 60
print("ROWS", sorted(TurnStart.objects.values_list("turn_id", flat=True)))
ThreadLease.objects.filter(thread_id="t4").delete()
print("AGAIN", backend.admit_sync("alice", "t5").counted, TurnStart.objects.count())
"""


@pytest.mark.engine_agnostic
@pytest.mark.engine_agnostic  # on a libSQL server of its own, whatever the run's engine
def test_db_backend_over_a_libsql_server(tmp_path, settings):
    """The same statements through the libSQL engine's remote path."""
    from tests.test_engine_remote import on_a_libsql_server, output

    proc = on_a_libsql_server(tmp_path, REMOTE_SCRIPT)
    assert proc.stdout.split("\n")[:4] == [
        "RATE 60", f"RUNNING {settings.OMNI_BUSY_RETRY_AFTER}", "ROWS ['t1']", "AGAIN True 1"], output(proc)
