"""The database backend (no ``REDIS_URL``): turn starts are rows of
:class:`chat_app.models.TurnStart`, one per *slot*.

A resource has slots ``0 .. OMNI_TURNS_PER_MINUTE - 1``; a slot is taken
while the start in it is under a minute old. Admitting a turn is one
statement that counts the resource's running turns, checks the rate and
takes a free slot (the first from a random one on, so that workers
racing for one resource mostly take different slots; the slots are
generated only up to the first free one), the same SQL on SQLite/libSQL
and PostgreSQL::

    WITH RECURSIVE free(k, n) AS (SELECT 1, :random UNION ALL
        SELECT k + 1, (n + 1) % :rate FROM free WHERE k < :rate)
    INSERT INTO turnstart (resource_id, slot, turn_id, started_ms)
    SELECT :resource, n, :turn, :now FROM free
    WHERE n NOT IN (slots of the resource taken since :now - 60 s)
      AND (starts of the resource since :now - 60 s) < :rate
      AND (live leases of the resource) <= :max_turns
    LIMIT 1
    ON CONFLICT (resource_id, slot) DO UPDATE SET turn_id = ..., started_ms = ...
        WHERE turnstart.started_ms <= :now - 60 s
    RETURNING slot

A row back: admitted, and counted in that slot. Nothing back: a second
statement reads the counts and says which limit refused (and how long to
wait), or, on PostgreSQL only, that another worker took the same free slot
in the same instant; then the upsert runs again (a fresh snapshot picks
another slot).

Why it is exact across workers: a slot's row is unique per resource, and
the conditional ``DO UPDATE`` is decided on the row's latest committed
version (PostgreSQL waits for a concurrent insert of the same slot and
re-checks; SQLite runs one writer at a time), so no two starts within a
minute ever hold the same slot: at most ``rate`` counted starts in any
sliding minute, whatever the number of workers. (Rows counted "by
snapshot" could overshoot on PostgreSQL under READ COMMITTED; slots
cannot.) Times are the workers' clocks, as the leases' are: keep them in
sync (NTP); a skew shifts a worker's window by as much.

Statements: ``admit`` is one statement when it admits, two when it
refuses, plus a ``DELETE`` of every start over a minute old at most once a
minute per process (so rows do not pile up for resources that stopped);
``cancel`` is one ``DELETE``. With ``OMNI_TURNS_PER_MINUTE=0`` ``admit``
is only the lease count (one ``SELECT``); with both limits 0, none.
"""

from __future__ import annotations

import random

from asgiref.sync import sync_to_async

from sessions_app.errors import RateLimited

from .. import sql
from .base import (
    WINDOW_MS, Admission, Backend, log, max_turns, too_many_starts, too_many_turns,
    turns_per_minute,
)


class DatabaseBackend(Backend):
    name = "database"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next_prune_ms = 0
        self.lost_races = 0  # upserts that lost a free slot to another worker (retried)

    # --- sync: one trip to the database thread ---
    def admit_sync(self, resource_id: str, turn_id: str) -> Admission:
        """Count the start of ``turn_id`` or raise :class:`RateLimited`."""
        rate, most = turns_per_minute(), max_turns()
        if rate <= 0 and most <= 0:
            return Admission(self, resource_id, turn_id)
        if rate <= 0:  # only the running turns to count
            if sql.live_leases(resource_id=resource_id) > most:
                raise too_many_turns(resource_id, most)
            return Admission(self, resource_id, turn_id)
        # Each lost race is a slot another worker took meanwhile: after
        # ``rate`` of them the window is full and the counts refuse.
        for _ in range(rate + 1):
            now = self.now_ms()
            cutoff = now - WINDOW_MS
            slot = sql.turn_start_take(resource_id=resource_id, turn_id=turn_id, now_ms=now, cutoff_ms=cutoff,
                                       rate=rate, first_slot=random.randrange(rate), max_turns=most)
            if slot is not None:
                self._prune(now)
                return Admission(self, resource_id, turn_id, token=slot)
            # refused, or (PostgreSQL) another worker took that slot just now
            starts, oldest, running = sql.turn_start_counts(resource_id=resource_id, cutoff_ms=cutoff,
                                                            max_turns=most)
            if most > 0 and running > most:
                raise too_many_turns(resource_id, most)
            if starts >= rate:
                raise too_many_starts(resource_id, rate, oldest, now)
            self.lost_races += 1
        raise RateLimited(
            f"resource {resource_id!r} is starting many turns at once on several servers; "
            "try again in 1 s", retry_after=1)

    def _prune(self, now: int) -> None:
        """Delete every start over a minute old, at most once a minute (per
        process): rows of resources that stopped starting turns go away."""
        if now < self._next_prune_ms:
            return
        self._next_prune_ms = now + WINDOW_MS
        try:
            sql.turn_start_prune(before_ms=now - WINDOW_MS)
        except Exception:  # the start is counted; the rows go at the next prune
            log.warning("could not prune old turn starts", exc_info=True)

    def uncount_sync(self, admission: Admission) -> None:
        """One ``DELETE`` (``QuerySet.delete()`` wraps it in a transaction: three)."""
        sql.turn_start_delete(resource_id=admission.resource_id, slot=admission.token,
                              turn_id=admission.turn_id)

    # --- async ---
    async def admit(self, resource_id: str, turn_id: str) -> Admission:
        if turns_per_minute() <= 0 and max_turns() <= 0:
            return Admission(self, resource_id, turn_id)  # no trip to the database
        return await sync_to_async(self.admit_sync)(resource_id, turn_id)

    async def uncount(self, admission: Admission) -> None:
        await sync_to_async(self.uncount_sync)(admission)

    def reset(self) -> None:
        self._next_prune_ms = 0
