"""Per-resource limits on turns (contract §4: 429 ``rate_limited`` with
``Retry-After``), counted across every server process.

* ``OMNI_MAX_TURNS_PER_RESOURCE``: turns of one resource running at once.
  Counted from the database, every worker's shared truth: the resource's
  live thread leases (:mod:`chat_app.leases`; each running turn holds one
  from its start to its end). ``Retry-After``: ``OMNI_BUSY_RETRY_AFTER``.
* ``OMNI_TURNS_PER_MINUTE``: turns one resource may start in any sliding
  60 seconds. Counted in Redis when ``REDIS_URL`` is set
  (:mod:`.redis`; in the database while Redis does not answer), else in
  the database (:mod:`.db`). ``Retry-After``:
  until the oldest start in the window is a minute old.

0 turns a limit off. A turn is counted when it starts: :func:`admit` runs
after the turn took its thread's lease (so its own lease is in the count)
and before its Claude process is checked out; a turn that then does not
start (503 ``server_busy``) gives its start back with
:meth:`Admission.cancel`, and a refused start (429) is never counted.

:func:`admit` is one trip to the database thread (the database backend:
one statement when admitted) or one database statement and one Redis
script run side by side (the Redis backend).
"""

from __future__ import annotations

from sessions_app.errors import RateLimited  # noqa: F401  (limits.RateLimited, as before)

from .base import WINDOW_MS, Admission, Backend
from .db import DatabaseBackend
from .redis import RedisBackend, redis_prefix, redis_url

__all__ = ["Admission", "Backend", "DatabaseBackend", "RedisBackend", "WINDOW_MS", "admit",
           "backend", "reset"]

_backend: Backend | None = None
_backend_key: tuple | None = None


def backend() -> Backend:
    """The configured backend: Redis with ``REDIS_URL``, else the database."""
    global _backend, _backend_key
    url = redis_url()
    key = ("redis", url, redis_prefix()) if url else ("database",)
    if _backend is None or key != _backend_key:
        if _backend is not None:
            _backend.reset()
        _backend = RedisBackend(url, key[2]) if url else DatabaseBackend()
        _backend_key = key
    return _backend


async def admit(resource_id: str, turn_id: str) -> Admission:
    """Before a turn starts: raise :class:`~sessions_app.errors.RateLimited`
    (429, ``retry_after`` seconds) when the resource already runs
    ``OMNI_MAX_TURNS_PER_RESOURCE`` turns across all workers (the calling
    turn's own lease included: refused when the count is over the limit),
    or started ``OMNI_TURNS_PER_MINUTE`` turns in the last sliding 60 s
    across all workers; else count this start and return an
    :class:`Admission` (whose ``cancel()`` uncounts it)."""
    return await backend().admit(resource_id, turn_id)


def reset() -> None:
    """Forget this process's limiter state (tests): the backend's clients and timers."""
    global _backend, _backend_key
    if _backend is not None:
        _backend.reset()
    _backend = _backend_key = None

