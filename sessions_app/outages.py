"""Database work outside a request that outlives a dropped connection and a
short outage.

Django replaces a broken persistent connection only around a request
(``close_old_connections`` on ``request_started``/``request_finished``).
The work that runs outside any request, on the turns' and websockets'
database thread (the transcript store, the thread leases, a turn's last
save), never gets that: a connection the database dropped (a restart, a
failover, a network blip) stays broken, and every query on it fails ("the
connection is lost") until something closes it. Two helpers:

* :func:`reconnecting` (sync): runs one unit of ORM work (at most one
  transaction) on a usable connection. Before it, a connection that an
  earlier error left unusable is replaced (Django's
  ``close_if_unusable_or_obsolete``: a round trip only after an error, none
  on the usual path). A connection found broken at its first use (the
  work fails and the connection answers no ``SELECT 1`` any more) is
  closed and the work runs once more on a new one. If that fails too
  because the database cannot be reached, it raises :class:`ConnectionLost`.
  So the work must be safe to run twice (idempotent): a broken connection
  may have taken the first run's commit with it, or not.
* :func:`outlasting` (async): awaits such work again, with a short
  backoff, while it raises :class:`ConnectionLost`, for as long as the
  caller says it may wait (a lease's remaining time, a store's patience).
  The waits are on the event loop, never on the database thread, which
  every other turn of the worker shares.

Engines: PostgreSQL's ``is_usable`` is Django's (``SELECT 1``); the libSQL
engine's (``omni.db.libsql``) answers for a remote server and a file alike.
An error on a connection that is still usable (a constraint, a lock
timeout, a full disk) is not a lost connection: it is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from django.db import DEFAULT_DB_ALIAS, DatabaseError, DataError, IntegrityError, OperationalError, connections

log = logging.getLogger("omni.chat")

T = TypeVar("T")

FIRST_DELAY = 0.25  # seconds between attempts while the database is away, doubling...
MAX_DELAY = 1.0  # ...up to this: a turn waiting on it goes on within a second of its return


class ConnectionLost(OperationalError):
    """The database could not be reached, on a new connection too."""


def _lost(connection) -> bool:
    """Whether the connection is gone or answers no query any more."""
    return connection.connection is None or not connection.is_usable()


def reconnecting(fn: Callable[..., T], *args, using: str = DEFAULT_DB_ALIAS, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a usable connection of ``using`` (see the
    module doc). Inside a caller's transaction it only runs ``fn``: the
    caller's transaction is the unit to run again."""
    connection = connections[using]
    if connection.in_atomic_block:
        return fn(*args, **kwargs)
    if connection.errors_occurred:  # an earlier error: is it still usable?
        connection.close_if_unusable_or_obsolete()
    was_open = connection.connection is not None
    try:
        return fn(*args, **kwargs)
    except (DataError, IntegrityError):
        raise
    except DatabaseError as exc:
        if connection.in_atomic_block or not _lost(connection):
            raise
        if was_open:
            log.info("[DB] A database connection was found broken (%s); reconnecting", str(exc).strip())
        connection.close()
    try:
        return fn(*args, **kwargs)
    except (DataError, IntegrityError):
        raise
    except DatabaseError as exc:
        if connection.in_atomic_block or not _lost(connection):
            raise
        connection.close()
        raise ConnectionLost(str(exc).strip() or "the database could not be reached") from exc


async def outlasting(call: Callable[[], Awaitable[T]], seconds_left: Callable[[], float],
                     what: str) -> T:
    """``await call()``, again while it raises :class:`ConnectionLost` and
    ``seconds_left()`` allows one more wait (0.25 s, doubling up to 1 s);
    then the last :class:`ConnectionLost` is raised. ``what`` names the work
    in the log (once when it starts waiting, once when it got through)."""
    delay, waited_since = FIRST_DELAY, None
    while True:
        try:
            value = await call()
        except ConnectionLost as exc:
            if seconds_left() <= delay:
                log.warning("[DB] Gave up on %s: the database was unreachable: %s", what, exc)
                raise
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("[DB] The database is unreachable; %s waits for it: %s", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            continue
        if waited_since is not None:
            log.info("[DB] The database is back; %s went through after %.1f s", what,
                     time.monotonic() - waited_since)
        return value


def within(seconds: float) -> Callable[[], float]:
    """A ``seconds_left`` for :func:`outlasting`: ``seconds`` from now."""
    end = time.monotonic() + seconds
    return lambda: end - time.monotonic()
