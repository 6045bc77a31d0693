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

    INSERT INTO lease (key, owner=me, token=1, expires_at=now+ttl)
    ON CONFLICT (key) DO UPDATE SET owner=me, token=token+1, expires_at=now+ttl
        WHERE lease.expires_at <= now
    RETURNING token

A row comes back if the lease is ours: a new thread's row, or an expired
lease taken over. A live lease fails the ``WHERE`` and nothing comes back.
Two takers racing on an expired row are serialized by the database: the
second sees the row no longer expired.

``token`` is the fencing token: it grows on every take. Renewal and release
are conditional on ``owner`` (which names one take), so a holder that lost
its lease (it stalled past the expiry and another worker took over) cannot
extend or release the new holder's lease; it learns it lost at its next
renewal, and :meth:`Lease.check` tells a writer before it writes.

Times are the workers' clocks (``timezone.now()``): keep them in sync (NTP);
a skew eats into the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, router
from django.utils import timezone

from sessions_app.errors import Conflict

from .models import ThreadLease

log = logging.getLogger("omni.chat")

# Names this process in the owner column (for people reading the table).
PROCESS = f"{socket.gethostname()}:{os.getpid()}"


def lease_seconds() -> float:
    return float(settings.OMNI_LEASE_SECONDS)


class LeaseLost(Exception):
    """This process no longer holds the thread's lease."""


@dataclass
class Lease:
    resource_id: str
    thread_id: str
    owner: str
    token: int
    released: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_id, self.thread_id)

    def _row(self):
        return ThreadLease.objects.filter(
            resource_id=self.resource_id, thread_id=self.thread_id, owner=self.owner)

    # --- sync (ORM) ---
    def renew_sync(self) -> bool:
        """Push the expiry out by a TTL; False if the lease was lost."""
        expires = timezone.now() + timedelta(seconds=lease_seconds())
        return self._row().filter(expires_at__gt=timezone.now()).update(expires_at=expires) == 1

    def release_sync(self) -> None:
        """Let the lease lapse now (the row and its token stay for the next take)."""
        self.released = True  # first: a renewal racing the release is not a loss
        self._row().update(expires_at=timezone.now() - timedelta(seconds=1), owner="")

    def held_sync(self) -> bool:
        return self._row().filter(token=self.token, expires_at__gt=timezone.now()).exists()

    # --- async ---
    async def renew(self) -> bool:
        return await sync_to_async(self.renew_sync)()

    async def release(self) -> None:
        if not self.released:
            await sync_to_async(self.release_sync)()

    async def check(self) -> None:
        """Raise :class:`LeaseLost` unless this lease is still ours and live."""
        if self.released or not await sync_to_async(self.held_sync)():
            raise LeaseLost(f"the lease of thread {self.thread_id!r} (token {self.token}) was lost")


def acquire_sync(resource_id: str, thread_id: str) -> Lease | None:
    """Take the thread's lease, or None if another turn holds it."""
    owner = f"{PROCESS}:{uuid.uuid4().hex}"
    now = timezone.now()
    expires = now + timedelta(seconds=lease_seconds())
    connection = connections[router.db_for_write(ThreadLease)]
    quote, adapt = connection.ops.quote_name, connection.ops.adapt_datetimefield_value
    table = quote(ThreadLease._meta.db_table)
    column = {f.name: quote(f.column) for f in ThreadLease._meta.concrete_fields}
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({column['resource_id']}, {column['thread_id']}, {column['owner']}, "
            f"{column['token']}, {column['expires_at']}) VALUES (%s, %s, %s, 1, %s) "
            f"ON CONFLICT ({column['resource_id']}, {column['thread_id']}) DO UPDATE SET "
            f"{column['owner']} = excluded.{column['owner']}, "
            f"{column['token']} = {table}.{column['token']} + 1, "
            f"{column['expires_at']} = excluded.{column['expires_at']} "
            f"WHERE {table}.{column['expires_at']} <= %s "
            f"RETURNING {column['token']}",
            [resource_id, thread_id, owner, adapt(expires), adapt(now)],
        )
        row = cursor.fetchone()
    return None if row is None else Lease(resource_id, thread_id, owner, row[0])


async def acquire(resource_id: str, thread_id: str) -> Lease:
    """Take the thread's lease or raise 409 ``thread_busy``."""
    lease = await sync_to_async(acquire_sync)(resource_id, thread_id)
    if lease is None:
        raise Conflict(f"thread {thread_id!r} is busy with another turn", code="thread_busy")
    return lease


def active_sync(resource_id: str, thread_id: str) -> ThreadLease | None:
    """The thread's live lease, if a turn runs on it anywhere."""
    return ThreadLease.objects.filter(
        resource_id=resource_id, thread_id=thread_id, expires_at__gt=timezone.now()).first()


async def active(resource_id: str, thread_id: str) -> ThreadLease | None:
    return await sync_to_async(active_sync)(resource_id, thread_id)


def latest_sync(resource_id: str, thread_id: str) -> ThreadLease | None:
    """The thread's lease row, live or not: its token names the last turn."""
    return ThreadLease.objects.filter(resource_id=resource_id, thread_id=thread_id).first()


async def latest(resource_id: str, thread_id: str) -> ThreadLease | None:
    return await sync_to_async(latest_sync)(resource_id, thread_id)


async def keep_renewed(lease: Lease, on_lost) -> None:
    """Renew ``lease`` every TTL/3 until cancelled; call ``on_lost()`` (a
    coroutine function) once if it is lost. A renewal that fails for a
    database error is retried at the next tick: the lease only counts as
    lost when the row says so (or when it expired meanwhile)."""
    interval = max(lease_seconds() / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        if lease.released:
            return
        try:
            ok = await lease.renew()
        except Exception:
            log.warning("could not renew the lease of thread %s", lease.thread_id, exc_info=True)
            continue
        if not ok and not lease.released:
            log.error("[CHAT] Lost the lease of thread %s (token %s)", lease.thread_id, lease.token)
            await on_lost()
            return
