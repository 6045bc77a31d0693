"""A dropped database connection and a short outage, in process, on the test
run's engine (issue 22, findings 3 and 4; the live worker behind a proxy is
tests/test_db_outage.py): the transcript store replaces a broken connection
and waits for a database that is away, the lease's renewal outlasts an
outage shorter than the lease, and gives up once the lease ran out."""

import asyncio
import time
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connections

from chat_app import leases
from sessions_app.outages import ConnectionLost, reconnecting
from sessions_app.transcripts import DjangoSessionStore

pytestmark = pytest.mark.django_db(transaction=True)


def _outage(seconds: float) -> None:
    """On this thread's connection: the database drops it now and refuses
    new ones for ``seconds`` (a restart when 0)."""
    connection = connections["default"]
    connection.ensure_connection()
    real = type(connection).get_new_connection
    back_at = time.monotonic() + seconds

    def refusing(params):
        if time.monotonic() < back_at:
            raise connection.Database.OperationalError("connection refused (a test's outage)")
        return real(connection, params)

    connection.get_new_connection = refusing
    connection.connection.close()  # behind Django's back, as a server going away does


def _healed() -> None:
    connection = connections["default"]
    connection.__dict__.pop("get_new_connection", None)
    connection.close()


async def outage(seconds: float = 0.0) -> None:
    """:func:`_outage` on the database thread the store and the leases use."""
    await sync_to_async(_outage, thread_sensitive=True)(seconds)


@pytest.fixture
async def heal():
    yield
    await sync_to_async(_healed, thread_sensitive=True)()


def key():
    return {"project_key": "p", "session_id": str(uuid.uuid4())}


def entry(n: int) -> dict:
    return {"type": "user", "uuid": str(uuid.uuid4()), "n": n}


async def test_a_store_write_after_a_database_restart_reconnects(heal):
    store, k = DjangoSessionStore(), key()
    await store.append(k, [entry(1)])
    await outage(0)
    await store.append(k, [entry(2)])
    assert [e["n"] for e in await store.load(k)] == [1, 2]


async def test_a_store_write_waits_for_a_database_that_is_briefly_away(heal):
    k = key()
    await DjangoSessionStore().append(k, [entry(1)])
    await outage(0.8)
    await DjangoSessionStore(outage_seconds=5).append(k, [entry(2)])
    assert [e["n"] for e in await DjangoSessionStore().load(k)] == [1, 2]


async def test_a_store_write_without_patience_fails_at_once_while_the_database_is_away(heal):
    k = key()
    await outage(30)
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        await DjangoSessionStore().append(k, [entry(1)])
    assert time.monotonic() - started < 5


def test_reconnecting_leaves_an_error_of_a_usable_connection_alone():
    calls = []

    def failing():
        calls.append(1)
        connections["default"].ensure_connection()
        raise OperationalError("a lock timeout, say")

    with pytest.raises(OperationalError) as raised:
        reconnecting(failing)
    assert not isinstance(raised.value, ConnectionLost) and calls == [1]  # not run again


async def test_lease_renewal_outlasts_an_outage_shorter_than_the_lease(settings, heal):
    settings.OMNI_LEASE_SECONDS = 1.5
    lease = await leases.acquire("r", f"t-{uuid.uuid4().hex[:8]}", "turn1")
    lost = []

    async def on_lost(**why):
        lost.append(why)

    renewal = asyncio.create_task(leases.keep_renewed(lease, on_lost))
    try:
        await outage(1.0)  # longer than a renewal interval (0.5 s), shorter than the lease
        expiry = lease.expires_at
        deadline = time.monotonic() + 10
        while lease.expires_at == expiry and not lost and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert lost == [] and lease.expires_at > expiry, "renewed once the database was back"
        await lease.check()  # still ours
    finally:
        renewal.cancel()


async def test_lease_renewal_gives_up_once_the_lease_ran_out_with_the_database_away(settings, heal):
    settings.OMNI_LEASE_SECONDS = 0.6
    lease = await leases.acquire("r", f"t-{uuid.uuid4().hex[:8]}", "turn1")
    lost = asyncio.Event()
    why = {}

    async def on_lost(**reason):
        why.update(reason)
        lost.set()

    renewal = asyncio.create_task(leases.keep_renewed(lease, on_lost))
    try:
        await outage(30)
        await asyncio.wait_for(lost.wait(), 5)
        assert why == {"deleted": False, "unreachable": True}
        assert lease.remaining() < 0.5
    finally:
        renewal.cancel()
