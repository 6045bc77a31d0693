"""The thread lease (chat_app/leases.py): take, busy, renew, expiry, release, fencing."""

import asyncio
from datetime import timedelta

import pytest
from django.utils import timezone

from chat_app import leases
from chat_app.models import ThreadLease
from sessions_app.errors import Conflict

pytestmark = pytest.mark.django_db(transaction=True)


def expire(resource="r", thread="t"):
    """Make the thread's lease run out now (a worker that stopped renewing)."""
    ThreadLease.objects.filter(resource_id=resource, thread_id=thread).update(
        expires_at=timezone.now() - timedelta(seconds=1))


def test_take_then_busy_for_everyone_else():
    first = leases.acquire_sync("r", "t")
    assert first is not None and first.token == 1
    assert leases.acquire_sync("r", "t") is None
    assert leases.active_sync("r", "t").owner == first.owner
    # other threads and other resources are independent
    assert leases.acquire_sync("r", "t2") is not None
    assert leases.acquire_sync("r2", "t") is not None


def test_release_frees_the_thread_and_the_next_take_gets_a_higher_token():
    first = leases.acquire_sync("r", "t")
    first.release_sync()
    assert leases.active_sync("r", "t") is None
    second = leases.acquire_sync("r", "t")
    assert second is not None and second.token == first.token + 1
    assert ThreadLease.objects.count() == 1  # one row per thread, reused


def test_renew_extends_the_expiry(settings):
    settings.OMNI_LEASE_SECONDS = 5
    lease = leases.acquire_sync("r", "t")
    before = ThreadLease.objects.get().expires_at
    settings.OMNI_LEASE_SECONDS = 60
    assert lease.renew_sync() is True
    assert ThreadLease.objects.get().expires_at > before + timedelta(seconds=50)


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off():
    old = leases.acquire_sync("r", "t")
    expire()
    new = leases.acquire_sync("r", "t")
    assert new is not None and new.token == old.token + 1
    # the old holder can neither renew, nor pass a check, nor release the new lease
    assert old.renew_sync() is False
    assert old.held_sync() is False
    old.release_sync()
    assert leases.active_sync("r", "t").owner == new.owner
    assert new.held_sync() is True
    with pytest.raises(leases.LeaseLost):
        asyncio.run(old.check())


def test_an_expired_lease_that_nobody_took_is_not_renewed():
    lease = leases.acquire_sync("r", "t")
    expire()
    assert lease.renew_sync() is False  # someone may be taking it: the holder stops


def test_only_one_of_many_racing_takers_wins():
    expire()  # no row yet: a no-op
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def take(_):
        try:
            return leases.acquire_sync("r", "race")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(6) as pool:
        won = [lease for lease in pool.map(take, range(6)) if lease is not None]
    assert len(won) == 1


async def test_acquire_raises_thread_busy():
    await leases.acquire("r", "busy")
    with pytest.raises(Conflict) as caught:
        await leases.acquire("r", "busy")
    assert caught.value.code == "thread_busy" and caught.value.status == 409


async def test_keep_renewed_reports_a_lost_lease(settings):
    settings.OMNI_LEASE_SECONDS = 0.3
    lease = await leases.acquire("r", "lost")
    lost = asyncio.Event()

    async def on_lost():
        lost.set()

    task = asyncio.create_task(leases.keep_renewed(lease, on_lost))
    try:
        await asyncio.sleep(0.25)  # renewed at least once: still live past the first TTL
        assert await leases.active("r", "lost") is not None
        from asgiref.sync import sync_to_async

        await sync_to_async(expire)("r", "lost")
        await asyncio.wait_for(lost.wait(), 2)
    finally:
        task.cancel()
