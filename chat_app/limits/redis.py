"""The Redis backend (``REDIS_URL`` set): a resource's turn starts of the
last minute are a sorted set in Redis, ``<OMNI_REDIS_PREFIX>:limits:starts:<resource>``,
scored by start time (milliseconds) with the turn ids as members.

Admitting a start is one Lua script, atomic in Redis whatever the number of
workers: drop the entries over a minute old, count, add this turn when under
the limit (and give the key a TTL of a minute, so an idle resource's key
goes away), else answer with the oldest entry's time, from which the
``Retry-After`` follows. ``cancel`` is one ``ZREM``. The script is
idempotent for one turn id (a retried call after a lost answer does not
count the turn twice, nor refuse it against its own entry).

The running turns are still counted in the database (the live thread
leases): one ``SELECT``, in parallel with the script. When that count
refuses, the start the script just counted is removed again (``ZREM``).

A Redis failure (down, timing out) neither stops turns nor lifts the
limit (issue 22, item 6): while Redis does not answer, starts are counted
in the database instead, by the database backend (:mod:`.db`), which is
exact across workers too; Redis is tried again every :data:`RETRY_SECONDS`
(no timeout paid per turn during an outage). Refusing every turn for a
Redis outage would turn the limiter into an outage of its own; letting
every turn through would lift the limit exactly when a misbehaving client
may be why Redis fell over. One warning line when Redis fails, one when it
answers again. The two counts are separate: in the minute after each
switch a resource may start up to twice its rate (the starts of the other
store are not seen). A database failure is not swallowed: the turn's own
lease and mapping live there, so it fails with the project's database
``503`` as any other call would.

Times are the workers' clocks (the script takes ``now`` as an argument, as
the database backend does; tests inject a clock): keep them in sync (NTP).

An asyncio Redis client is bound to the event loop it first ran on; this
backend keeps one per running loop (daphne has one; each test has its own)
and drops the ones of loops that closed.
"""

from __future__ import annotations

import asyncio
import os
import time

from asgiref.sync import sync_to_async
from django.conf import settings

from .base import (
    WINDOW_MS, Admission, Backend, live_leases_sync, log, max_turns, too_many_starts,
    too_many_turns, turns_per_minute,
)
from .db import DatabaseBackend

# After a Redis failure, count in the database for this long before trying Redis again.
RETRY_SECONDS = 5.0
# Redis answers a script in well under a millisecond: a turn never waits long for a sick one.
SOCKET_TIMEOUT = 1.0

# KEYS[1]: the resource's set; ARGV: now (ms), window (ms), limit, turn id.
# Returns {1, count} when counted, {0, count, oldest score} when refused.
ADMIT = """
local key, now, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZSCORE', key, member) then
  return {1, redis.call('ZCARD', key)}
end
local count = redis.call('ZCARD', key)
if count >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, count, oldest[2]}
end
redis.call('ZADD', key, now, member)
redis.call('PEXPIRE', key, window)
return {1, count + 1}
"""


def redis_url() -> str | None:
    return getattr(settings, "REDIS_URL", None) or None


def redis_prefix() -> str:
    """Keys go under the channel layer's prefix (``OMNI_REDIS_PREFIX``):
    deployments (and test runs) sharing one Redis stay apart."""
    return (getattr(settings, "OMNI_REDIS_PREFIX", None)
            or os.environ.get("OMNI_REDIS_PREFIX") or "omni")


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, url: str, prefix: str = "omni", clock=time.time):
        super().__init__(clock)
        self.url = url
        self.prefix = prefix
        self._clients: dict[asyncio.AbstractEventLoop, tuple] = {}
        self._skip_until = 0.0  # monotonic: Redis failed, count in the database until then
        self._down = False  # Redis failed and has not answered since
        self.database = DatabaseBackend(clock)  # where starts are counted while Redis is down

    def key(self, resource_id: str) -> str:
        return f"{self.prefix}:limits:starts:{resource_id}"

    # --- the client of this event loop ---
    def _client(self):
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]  # its connections die with it
            client = redis.asyncio.Redis.from_url(
                self.url, socket_connect_timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
                # one quick retry (a pooled connection the server closed), no backoff
                retry=Retry(NoBackoff(), 1))
            found = self._clients[loop] = (client, client.register_script(ADMIT))
        return found

    async def aclose(self) -> None:
        """Close this loop's client (tests; a server just exits)."""
        found = self._clients.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[0].aclose()

    def reset(self) -> None:
        self._clients.clear()
        self._skip_until = 0.0
        self._down = False
        self.database.reset()

    # --- starts ---
    async def count_start(self, resource_id: str, turn_id: str, rate: int) -> Admission:
        """Count the start in Redis or raise :class:`RateLimited`; while
        Redis fails, in the database (see the module's docstring)."""
        if time.monotonic() < self._skip_until:
            return await self.database.admit(resource_id, turn_id)
        now = self.now_ms()
        try:
            _, script = self._client()
            answer = await script(keys=[self.key(resource_id)],
                                  args=[now, WINDOW_MS, rate, turn_id])
        except Exception as exc:
            self._skip_until = time.monotonic() + RETRY_SECONDS
            if not self._down:
                self._down = True
                log.warning("turn limits: Redis failed (%s: %s); counting turn starts in the database "
                            "until it answers (tried again every %ss)", type(exc).__name__, exc, RETRY_SECONDS)
            return await self.database.admit(resource_id, turn_id)
        if self._down:
            self._down = False
            log.warning("turn limits: Redis answers again; counting turn starts in Redis")
        if int(answer[0]) == 1:
            return Admission(self, resource_id, turn_id, token=self.key(resource_id))
        raise too_many_starts(resource_id, rate, int(float(answer[2])), now)

    async def admit(self, resource_id: str, turn_id: str) -> Admission:
        rate, most = turns_per_minute(), max_turns()
        if rate <= 0 and most <= 0:
            return Admission(self, resource_id, turn_id)
        if rate > 0 and time.monotonic() < self._skip_until:
            return await self.database.admit(resource_id, turn_id)  # both limits, one statement
        if most <= 0:
            return await self.count_start(resource_id, turn_id, rate)
        if rate <= 0:
            if await sync_to_async(live_leases_sync)(resource_id) > most:
                raise too_many_turns(resource_id, most)
            return Admission(self, resource_id, turn_id)
        # both: the lease count (database) and the script (Redis) at once
        running, start = await asyncio.gather(
            sync_to_async(live_leases_sync)(resource_id),
            self.count_start(resource_id, turn_id, rate),
            return_exceptions=True)
        if isinstance(running, BaseException) or running > most:
            if isinstance(start, Admission):
                await start.cancel()  # counted for nothing
            if isinstance(running, BaseException):
                raise running
            raise too_many_turns(resource_id, most)
        if isinstance(start, BaseException):
            raise start  # over the rate
        return start

    async def uncount(self, admission: Admission) -> None:
        client, _ = self._client()
        await client.zrem(admission.token, admission.turn_id)
