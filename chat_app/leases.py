"""One turn per thread across server processes: a lease row in the database.

A turn takes its thread's lease in ``start_turn`` (before the response
starts), renews it every ``OMNI_LEASE_SECONDS / 3`` while it runs and lets it
lapse at its end. A worker that dies stops renewing: its lease expires on its
own and the next turn on the thread, on any worker, takes it over.

Why the database and not a Redis lock: the database is the one thing every
deployment shares (the embedded libSQL file, PostgreSQL, a libSQL server),
so the lease works with or without ``REDIS_URL``, and it lives next to the
data it protects (the mapping and the transcript) instead of in a second
system with its own failure modes. A take is one atomic statement, the
same on SQLite/libSQL (3.35+) and PostgreSQL, one round trip on every turn::

    INSERT INTO lease (key, turn_id=mine, token=1, expires_at=now+ttl, holder=me)
    ON CONFLICT (key) DO UPDATE SET turn_id=mine, token=token+1, expires_at=now+ttl, holder=me
        WHERE lease.expires_at <= now
    RETURNING token

A row comes back if the lease is ours: a new thread's row, or an expired
lease taken over. A live lease fails the ``WHERE`` and nothing comes back.
Two takers racing on an expired row are serialized by the database: the
second sees the row no longer expired.

**A dead holder on this host.** The row names its holder: the host
(:data:`HOST_ID`: the kernel's boot id, the pid namespace and the host name,
hashed) and the process (pid and its start time, so a reused pid is not
mistaken for it). When the take fails, the live lease is read; if its holder
is a process of this host that no longer runs (a worker killed and
restarted), it is taken at once, conditional on the same ``turn_id``, instead
of waiting out the TTL. A lease held on another host is waited out: this
process cannot know whether that one lives. Either way ``thread_busy``
carries ``Retry-After``: the lease's remaining time.

``token`` is the fencing token: it grows on every take. Renewal and release
are conditional on ``turn_id`` (which names one take), so a holder that lost
its lease (it stalled past the expiry and another worker took over) cannot
extend or release the new holder's lease; it learns it lost at its next
renewal, and :meth:`Lease.check` tells a writer before it writes. A thread's
row is deleted with the thread (:func:`forget_sync`), which a running turn
learns the same way.

Times are the workers' clocks (``timezone.now()``): keep them in sync (NTP);
a skew eats into the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from sessions_app.errors import Conflict
from sessions_app.outages import ConnectionLost, outlasting, reconnecting

from . import sql
from .models import ThreadLease
from .sdk import process_state

log = logging.getLogger("omni.chat")


def lease_seconds() -> float:
    return float(settings.OMNI_LEASE_SECONDS)


# --- who holds a lease ---------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, ``/proc/<pid>/stat``
    field 22), or None if it does not run (a zombie does not run)."""
    state = process_state(pid)
    if state is None or state[0] in ("Z", "X"):
        return None
    return state[1]


def _host_id() -> str:
    """This host, as far as pids mean the same thing: one kernel boot and one
    pid namespace (and the host name, for hosts without ``/proc``, which
    never match: see :func:`holder_is_dead`)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    if not boot or not namespace:
        return ""
    return hashlib.sha256(f"{boot}|{namespace}|{socket.gethostname()}".encode()).hexdigest()[:32]


HOST = socket.gethostname()[:255]
HOST_ID = _host_id()


@dataclass(frozen=True)
class Holder:
    """The server process taking a lease."""

    host_id: str
    pid: int
    started: int | None

    @classmethod
    def me(cls) -> Holder:
        # Kept per pid: a forked worker (gunicorn-style) has its own.
        global _me
        pid = os.getpid()
        if _me is None or _me.pid != pid:
            _me = cls(HOST_ID, pid, process_start(pid))
        return _me


_me: Holder | None = None


def holder_is_dead(row: ThreadLease) -> bool:
    """True only when the row's holder certainly no longer runs: a process
    of this host (same boot, same pid namespace) whose pid is gone or now
    names another process. Anything unknown counts as alive."""
    if not HOST_ID or row.host_id != HOST_ID or not row.pid or row.pid_started is None:
        return False
    return process_start(row.pid) != row.pid_started


# --- the lease -------------------------------------------------------------------------

class LeaseLost(Exception):
    """This process no longer holds the thread's lease."""


@dataclass
class Lease:
    resource_id: str
    thread_id: str
    turn_id: str
    token: int
    expires_at: datetime = field(default_factory=timezone.now)
    released: bool = False
    # Whether messages waited in the thread's queue when the last save let
    # the lease go (None: not known, the lease went another way).
    queue_waiting: bool | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_id, self.thread_id)

    def remaining(self) -> float:
        """Seconds until this lease runs out unless renewed."""
        return max(0.0, (self.expires_at - timezone.now()).total_seconds())

    def _row(self):
        return ThreadLease.objects.filter(
            resource_id=self.resource_id, thread_id=self.thread_id, turn_id=self.turn_id)

    # --- sync (ORM) ---
    def renew_sync(self) -> bool:
        """Push the expiry out by a TTL; False if the lease was lost."""
        now = timezone.now()
        expires = now + timedelta(seconds=lease_seconds())
        if self._row().filter(expires_at__gt=now).update(expires_at=expires) == 1:
            self.expires_at = expires
            return True
        return False

    def release_sync(self) -> None:
        """Let the lease lapse now (the row, its token and ``turn_id`` stay:
        they name the thread's last turn for a client reconnecting to it)."""
        self.released = True  # first: a renewal racing the release is not a loss
        self._row().update(expires_at=timezone.now() - timedelta(seconds=1))

    def release_if_held_sync(self) -> bool:
        """One ``UPDATE``: let the lease lapse now if it is still ours and
        live; False if it was lost. For a caller's transaction (a turn's last
        save): the caller marks it ``released`` once that commits. The same
        statement tells whether messages wait in the thread's queue
        (:attr:`queue_waiting`)."""
        waiting = sql.lease_release_if_held(resource_id=self.resource_id, thread_id=self.thread_id,
                                            turn_id=self.turn_id, token=self.token, now=timezone.now())
        self.queue_waiting = waiting
        return waiting is not None

    def held_sync(self) -> bool:
        return self._row().filter(token=self.token, expires_at__gt=timezone.now()).exists()

    def discard_sync(self) -> None:
        """Give back a lease whose turn never started (refused: 404, 409, 429,
        503). A row this take created (``token`` 1) is deleted, so refused
        requests for threads that do not exist leave no rows behind."""
        if self.token == 1:
            self.released = True
            self._row().delete()
        else:
            self.release_sync()

    # --- async: on a usable connection (one the database dropped is replaced:
    # sessions_app.outages; each of these is safe to run twice) ---
    async def discard(self) -> None:
        if not self.released:
            await sync_to_async(reconnecting)(self.discard_sync)

    async def renew(self) -> bool:
        return await sync_to_async(reconnecting)(self.renew_sync)

    async def renew_while_live(self) -> bool:
        """:meth:`renew`, tried again while the database cannot be reached
        and this lease has time left: an outage shorter than the lease
        costs nothing. Raises :class:`~sessions_app.outages.ConnectionLost`
        once the lease ran out with the database still away."""
        return await outlasting(self.renew, self.remaining, f"the lease of thread {self.thread_id}")

    async def release(self) -> None:
        if not self.released:
            await sync_to_async(reconnecting)(self.release_sync)

    async def check(self) -> None:
        """Raise :class:`LeaseLost` unless this lease is still ours and live."""
        if self.released or not await sync_to_async(reconnecting)(self.held_sync):
            raise LeaseLost(f"the lease of thread {self.thread_id!r} (token {self.token}) was lost")


def _take(resource_id: str, thread_id: str, turn_id: str, holder: Holder, now, expires) -> int | None:
    """The atomic take (see the module doc): the new token, or None."""
    return sql.lease_take(resource_id=resource_id, thread_id=thread_id, turn_id=turn_id, now=now,
                          expires=expires, host=HOST, host_id=holder.host_id, pid=holder.pid,
                          pid_started=holder.started)


def _take_from_dead(row: ThreadLease, turn_id: str, holder: Holder, expires) -> int | None:
    """Take a live lease whose holder died, if it is still that holder's."""
    return sql.lease_take_from_dead(pk=row.pk, held_turn_id=row.turn_id, held_token=row.token,
                                    turn_id=turn_id, expires=expires, host=HOST, host_id=holder.host_id,
                                    pid=holder.pid, pid_started=holder.started)


@dataclass
class Busy:
    """The thread's lease is held by a live turn: for ``Retry-After``."""

    turn_id: str
    retry_after: int


def acquire_sync(resource_id: str, thread_id: str, turn_id: str) -> Lease | Busy:
    """Take the thread's lease for turn ``turn_id``, or say how long it is busy."""
    holder = Holder.me()
    now = timezone.now()
    expires = now + timedelta(seconds=lease_seconds())
    token = _take(resource_id, thread_id, turn_id, holder, now, expires)
    if token is not None:
        return Lease(resource_id, thread_id, turn_id, token, expires)
    row = latest_sync(resource_id, thread_id)
    if row is not None and row.expires_at > now and holder_is_dead(row):
        token = _take_from_dead(row, turn_id, holder, expires)
        if token is not None:
            log.warning(
                "[CHAT] Took over the lease of thread %s from process %s, which died (turn %s)",
                thread_id, row.pid, row.turn_id)
            return Lease(resource_id, thread_id, turn_id, token, expires)
        row = latest_sync(resource_id, thread_id)  # someone else was quicker: how long now?
    if row is None or row.expires_at <= now:  # released meanwhile: try once more
        token = _take(resource_id, thread_id, turn_id, holder, now, expires)
        if token is not None:
            return Lease(resource_id, thread_id, turn_id, token, expires)
        row = latest_sync(resource_id, thread_id)
    left = (row.expires_at - now).total_seconds() if row is not None else 1
    return Busy(row.turn_id if row is not None else "", max(1, math.ceil(left)))


def busy_error(thread_id: str, retry_after: int | float) -> Conflict:
    return Conflict(f"thread {thread_id!r} is busy with another turn", code="thread_busy",
                    retry_after=max(1, math.ceil(retry_after)))


async def acquire(resource_id: str, thread_id: str, turn_id: str) -> Lease:
    """Take the thread's lease or raise 409 ``thread_busy`` (with ``Retry-After``)."""
    taken = await sync_to_async(acquire_sync)(resource_id, thread_id, turn_id)
    if isinstance(taken, Busy):
        raise busy_error(thread_id, taken.retry_after)
    return taken


def active_sync(resource_id: str, thread_id: str) -> ThreadLease | None:
    """The thread's live lease, if a turn runs on it anywhere."""
    return ThreadLease.objects.filter(
        resource_id=resource_id, thread_id=thread_id, expires_at__gt=timezone.now()).first()


async def active(resource_id: str, thread_id: str) -> ThreadLease | None:
    return await sync_to_async(active_sync)(resource_id, thread_id)


def latest_sync(resource_id: str, thread_id: str) -> ThreadLease | None:
    """The thread's lease row, live or not: its ``turn_id`` names the last turn."""
    return ThreadLease.objects.filter(resource_id=resource_id, thread_id=thread_id).first()


async def latest(resource_id: str, thread_id: str) -> ThreadLease | None:
    return await sync_to_async(latest_sync)(resource_id, thread_id)


def expire_dead_sync(row: ThreadLease) -> bool:
    """Let the live lease of a holder that died lapse now (an interrupt found
    nobody to answer it); True if it did."""
    if not holder_is_dead(row):
        return False
    return ThreadLease.objects.filter(pk=row.pk, turn_id=row.turn_id, token=row.token).update(
        expires_at=timezone.now() - timedelta(seconds=1)) == 1


def forget_sync(resource_id: str, thread_id: str) -> int:
    """Delete a thread's lease row (the thread was deleted). A turn still
    running on it loses its lease at its next renewal or check."""
    return ThreadLease.objects.filter(resource_id=resource_id, thread_id=thread_id).delete()[0]


async def keep_renewed(lease: Lease, on_lost) -> None:
    """Renew ``lease`` every TTL/3 until cancelled; call ``on_lost(deleted=)``
    (a coroutine function) once if it is lost (``deleted``: the row is gone
    with its thread, see :func:`forget_sync`). A renewal that cannot reach
    the database is tried again within a second, until the lease would run
    out (:meth:`Lease.renew_while_live`): only then is it lost, with
    ``on_lost(deleted=False, unreachable=True)``. Any other database error
    is retried at the next tick: the lease only counts as lost when the row
    says so (or when it expired meanwhile)."""
    interval = max(lease_seconds() / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        if lease.released:
            return
        try:
            ok = await lease.renew_while_live()
        except ConnectionLost:
            if lease.released:  # the turn's last save let it go meanwhile
                return
            log.error("[CHAT] Lost the lease of thread %s (token %s): the database was unreachable "
                      "until it ran out", lease.thread_id, lease.token)
            await on_lost(deleted=False, unreachable=True)
            return
        except Exception:
            log.warning("could not renew the lease of thread %s", lease.thread_id, exc_info=True)
            continue
        if not ok and not lease.released:
            deleted = await sync_to_async(reconnecting)(lambda: latest_sync(*lease.key) is None)
            log.error("[CHAT] Lost the lease of thread %s (token %s)%s", lease.thread_id, lease.token,
                      ": the thread was deleted" if deleted else "")
            await on_lost(deleted=deleted)
            return


@contextlib.asynccontextmanager
async def holding(lease: Lease, on_lost):
    """The lease's one owner while its turn runs: renewed every TTL/3
    (:func:`keep_renewed`, ``on_lost`` called if it is lost) and let go on
    the way out, unless the turn's last save let it go already (in that
    save's transaction, :meth:`Lease.release_if_held_sync`)."""
    renewal = asyncio.create_task(keep_renewed(lease, on_lost))
    try:
        yield lease
    finally:
        renewal.cancel()
        if not lease.released:
            try:
                await asyncio.shield(lease.release())
            except Exception:  # it lapses on its own at its expiry
                log.warning("could not release the lease of thread %s", lease.thread_id, exc_info=True)
