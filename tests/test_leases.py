"""The thread lease (chat_app/leases.py): take, busy, renew, expiry, release,
fencing, and a dead holder on this host taken over at once."""

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from chat_app import leases
from chat_app.models import ThreadLease
from sessions_app.errors import Conflict
from tests.helpers import wait_for_async

pytestmark = pytest.mark.django_db(transaction=True)


def take(resource, thread):
    """The lease for a new turn, or None when the thread is busy."""
    taken = leases.acquire_sync(resource, thread, uuid.uuid4().hex)
    return taken if isinstance(taken, leases.Lease) else None


def expire(resource="r", thread="t"):
    """Make the thread's lease run out now (a worker that stopped renewing)."""
    ThreadLease.objects.filter(resource_id=resource, thread_id=thread).update(
        expires_at=timezone.now() - timedelta(seconds=1))


def test_take_then_busy_for_everyone_else():
    first = take("r", "t")
    assert first is not None and first.token == 1
    assert take("r", "t") is None
    assert leases.active_sync("r", "t").turn_id == first.turn_id
    # other threads and other resources are independent
    assert take("r", "t2") is not None
    assert take("r2", "t") is not None


def test_release_frees_the_thread_and_the_next_take_gets_a_higher_token():
    first = take("r", "t")
    first.release_sync()
    assert leases.active_sync("r", "t") is None
    second = take("r", "t")
    assert second is not None and second.token == first.token + 1
    assert ThreadLease.objects.count() == 1  # one row per thread, reused


def test_renew_extends_the_expiry(settings):
    settings.OMNI_LEASE_SECONDS = 5
    lease = take("r", "t")
    before = ThreadLease.objects.get().expires_at
    settings.OMNI_LEASE_SECONDS = 60
    assert lease.renew_sync() is True
    assert ThreadLease.objects.get().expires_at > before + timedelta(seconds=50)


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off():
    old = take("r", "t")
    expire()
    new = take("r", "t")
    assert new is not None and new.token == old.token + 1
    # the old holder can neither renew, nor pass a check, nor release the new lease
    assert old.renew_sync() is False
    assert old.held_sync() is False
    old.release_sync()
    assert leases.active_sync("r", "t").turn_id == new.turn_id
    assert new.held_sync() is True
    with pytest.raises(leases.LeaseLost):
        asyncio.run(old.check())


def test_an_expired_lease_that_nobody_took_is_not_renewed():
    lease = take("r", "t")
    expire()
    assert lease.renew_sync() is False  # someone may be taking it: the holder stops


def test_only_one_of_many_racing_takers_wins():
    expire()  # no row yet: a no-op
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def racer(_):
        try:
            return take("r", "race")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(6) as pool:
        won = [lease for lease in pool.map(racer, range(6)) if lease is not None]
    assert len(won) == 1


async def test_acquire_raises_thread_busy():
    await leases.acquire("r", "busy", "turn1")
    with pytest.raises(Conflict) as caught:
        await leases.acquire("r", "busy", "turn2")
    assert caught.value.code == "thread_busy" and caught.value.status == 409
    # Retry-After: the lease's remaining time (OMNI_LEASE_SECONDS, 30 here)
    assert 28 <= caught.value.retry_after <= 30


async def test_keep_renewed_reports_a_lost_lease(settings):
    settings.OMNI_LEASE_SECONDS = 0.3
    lease = await leases.acquire("r", "lost", "turn1")
    lost = asyncio.Event()

    async def on_lost(deleted):
        assert deleted is False  # expired, not deleted with its thread
        lost.set()

    task = asyncio.create_task(leases.keep_renewed(lease, on_lost))
    try:
        first_expiry = lease.expires_at
        # renewed at least once, and past the first TTL: still live
        await wait_for_async(lambda: lease.expires_at > first_expiry and timezone.now() > first_expiry,
                             timeout=10, interval=0.02, message="a renewal, then the first TTL's end")
        assert await leases.active("r", "lost") is not None
        from asgiref.sync import sync_to_async

        await sync_to_async(expire)("r", "lost")
        await asyncio.wait_for(lost.wait(), 2)
    finally:
        task.cancel()


# --- a holder that died ------------------------------------------------------------

def held_by(pid, started, host_id=None, resource="r", thread="dead", seconds=30):
    """A live lease row as a server process ``pid`` (started at ``started``) left it."""
    return ThreadLease.objects.create(
        resource_id=resource, thread_id=thread, turn_id="theirs", token=7,
        expires_at=timezone.now() + timedelta(seconds=seconds),
        host_id=leases.HOST_ID if host_id is None else host_id, pid=pid, pid_started=started)


def a_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = leases.process_start(child.pid)
    assert started is not None
    return child, started


def test_a_lease_of_a_dead_process_of_this_host_is_taken_at_once():
    """A worker killed mid-turn and restarted: its old lease names a pid
    that no longer runs, so the thread is taken at once, not after the TTL."""
    child, started = a_process()
    try:
        held_by(child.pid, started)
        busy = leases.acquire_sync("r", "dead", "mine")
        assert isinstance(busy, leases.Busy) and 28 <= busy.retry_after <= 30
    finally:
        child.kill()
        child.wait()
    lease = leases.acquire_sync("r", "dead", "mine")
    assert isinstance(lease, leases.Lease) and lease.token == 8
    row = ThreadLease.objects.get(thread_id="dead")
    assert (row.turn_id, row.pid, row.host_id) == ("mine", os.getpid(), leases.HOST_ID)


def test_a_reused_pid_is_not_its_old_holder():
    """The pid runs again, but it is another process (another start time)."""
    me = leases.process_start(os.getpid())
    held_by(os.getpid(), me - 1)
    assert isinstance(leases.acquire_sync("r", "dead", "mine"), leases.Lease)


def test_a_live_holder_of_this_host_keeps_its_lease():
    held_by(os.getpid(), leases.process_start(os.getpid()))
    assert isinstance(leases.acquire_sync("r", "dead", "mine"), leases.Busy)


def test_a_lease_of_another_host_is_waited_out_with_retry_after():
    """This process cannot know whether a process of another host lives: the
    lease is waited out, and thread_busy says how long."""
    child, started = a_process()
    child.kill()
    child.wait()
    held_by(child.pid, started, host_id="another-host", seconds=12)
    busy = leases.acquire_sync("r", "dead", "mine")
    assert isinstance(busy, leases.Busy) and 11 <= busy.retry_after <= 12
    with pytest.raises(Conflict) as caught:
        asyncio.run(leases.acquire("r", "dead", "mine"))
    assert caught.value.retry_after in (11, 12)
    expire(thread="dead")
    assert isinstance(leases.acquire_sync("r", "dead", "mine"), leases.Lease)


def test_an_interrupt_for_a_dead_holder_frees_the_thread():
    child, started = a_process()
    child.kill()
    child.wait()
    row = held_by(child.pid, started)
    assert leases.expire_dead_sync(row) is True
    assert leases.active_sync("r", "dead") is None
    alive = held_by(os.getpid(), leases.process_start(os.getpid()), thread="alive")
    assert leases.expire_dead_sync(alive) is False
