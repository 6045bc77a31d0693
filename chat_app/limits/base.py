"""What both backends share: the admission a caller holds, the refusals,
and the count of a resource's running turns (its live thread leases)."""

from __future__ import annotations

import logging
import math
import time

from django.conf import settings

from sessions_app.errors import RateLimited

from .. import sql

log = logging.getLogger("omni.chat")

WINDOW_MS = 60_000  # the sliding window of OMNI_TURNS_PER_MINUTE


def turns_per_minute() -> int:
    return int(settings.OMNI_TURNS_PER_MINUTE)


def max_turns() -> int:
    return int(settings.OMNI_MAX_TURNS_PER_RESOURCE)


class Admission:
    """A turn start that was counted (or needed no counting). ``cancel()``
    gives the start back when the turn did not start after all."""

    __slots__ = ("backend", "resource_id", "turn_id", "token", "cancelled")

    def __init__(self, backend: Backend | None, resource_id: str, turn_id: str, token=None):
        self.backend = backend
        self.resource_id = resource_id
        self.turn_id = turn_id
        self.token = token  # what the backend needs to uncount it; None: nothing counted
        self.cancelled = False

    @property
    def counted(self) -> bool:
        return self.token is not None

    async def cancel(self) -> None:
        """The turn did not start after all (503 ``server_busy``): uncount
        its start. Never raises: a start that cannot be given back (the
        database or Redis failed) keeps counting until it is a minute old."""
        if self.cancelled or self.token is None:
            return
        self.cancelled = True
        try:
            await self.backend.uncount(self)
        except Exception:
            log.warning("could not uncount the refused start of turn %s (resource %s); it counts "
                        "for its minute", self.turn_id, self.resource_id, exc_info=True)

    def __repr__(self) -> str:
        return f"<Admission {self.resource_id} {self.turn_id} token={self.token!r}>"


class Backend:
    """Counts turn starts per resource in a sliding minute, across workers."""

    name = "base"

    def __init__(self, clock=time.time):
        self.clock = clock  # seconds (Unix time): injectable for tests

    def now_ms(self) -> int:
        return math.floor(self.clock() * 1000)

    async def admit(self, resource_id: str, turn_id: str) -> Admission:
        raise NotImplementedError

    async def uncount(self, admission: Admission) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget this process's state (clients, timers); counts stay where they are."""


# --- refusals ---------------------------------------------------------------------

def too_many_turns(resource_id: str, limit: int) -> RateLimited:
    return RateLimited(
        f"resource {resource_id!r} already runs {limit} turns; wait for one to end",
        retry_after=settings.OMNI_BUSY_RETRY_AFTER,
    )


def too_many_starts(resource_id: str, limit: int, oldest_ms: int, now_ms: int) -> RateLimited:
    """Over the rate: the wait is until the oldest start in the window is a minute old."""
    wait = max(1, math.ceil((oldest_ms + WINDOW_MS - now_ms) / 1000))
    return RateLimited(
        f"resource {resource_id!r} started {limit} turns in the last minute; try again in {wait} s",
        retry_after=wait,
    )


# --- running turns: live leases ----------------------------------------------------

def live_leases_sync(resource_id: str) -> int:
    """How many turns of ``resource_id`` run now, on every worker: one
    statement (:func:`chat_app.sql.live_leases`)."""
    return sql.live_leases(resource_id=resource_id)
