"""Every plain SQL statement of chat_app: the thread leases
(:mod:`chat_app.leases`) and the turn starts of the database limiter
(:mod:`chat_app.limits.db`). sessions_app's are in ``sessions_app/sql.py``,
whose helpers build these too (names from the models, values adapted by
their fields, an ``INSERT`` listing every concrete field with its default
for those not given: see its docstring).

Plain SQL because they run on every turn, where compiling the ORM's queries
cost more CPU than running them. Each statement is a function with keyword
parameters that runs it and returns what its caller needs; parameters are
named (``%(name)s``).
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from sessions_app.sql import Sql, connection_for, insert_values, names

from .models import ThreadLease, TurnStart


def _stamp(connection, when):
    return connection.ops.adapt_datetimefield_value(when)


# --- thread leases ---------------------------------------------------------------------


def lease_take(*, resource_id: str, thread_id: str, turn_id: str, now, expires, host: str, host_id: str,
               pid: int | None, pid_started: int | None) -> int | None:
    """The atomic take of a thread's lease (see :mod:`chat_app.leases`): a
    new row with token 1, or the row taken over if its lease expired (token
    + 1, every other column rewritten). The new token, or None (a live lease)."""
    connection = connection_for(ThreadLease)
    table, column = names(ThreadLease, connection)
    columns, placeholders, params = insert_values(ThreadLease, connection, {
        "resource_id": resource_id, "thread_id": thread_id, "token": Sql("1"), "turn_id": turn_id,
        "expires_at": expires, "host": host, "host_id": host_id, "pid": pid, "pid_started": pid_started})
    kept = {column["resource_id"], column["thread_id"], column["token"]}
    params["now"] = _stamp(connection, now)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(placeholders)}) "
            f"ON CONFLICT ({column['resource_id']}, {column['thread_id']}) DO UPDATE SET "
            f"{column['token']} = {table}.{column['token']} + 1, "
            + ", ".join(f"{name} = excluded.{name}" for name in columns if name not in kept)
            + f" WHERE {table}.{column['expires_at']} <= %(now)s RETURNING {column['token']}",
            params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def lease_take_from_dead(*, pk: int, held_turn_id: str, held_token: int, turn_id: str, expires, host: str,
                         host_id: str, pid: int | None, pid_started: int | None) -> int | None:
    """Take a live lease (row ``pk``) whose holder died, if it is still
    that holder's take (``held_turn_id``, ``held_token``): the new token, or None."""
    connection = connection_for(ThreadLease)
    table, column = names(ThreadLease, connection)
    written = {"turn_id": turn_id, "expires_at": _stamp(connection, expires), "host": host,
               "host_id": host_id, "pid": pid, "pid_started": pid_started}
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {column['token']} = {column['token']} + 1, "
            + ", ".join(f"{column[name]} = %({name})s" for name in written)
            + f" WHERE {column['id']} = %(pk)s AND {column['turn_id']} = %(held_turn_id)s "
            f"AND {column['token']} = %(held_token)s RETURNING {column['token']}",
            {**written, "pk": pk, "held_turn_id": held_turn_id, "held_token": held_token})
        taken = cursor.fetchone()
    return None if taken is None else taken[0]


def lease_release_if_held(*, resource_id: str, thread_id: str, turn_id: str, token: int,
                          now) -> bool | None:
    """Let a lease lapse now (``expires_at`` a second ago) if it is still
    this take's and live: one ``UPDATE``. None if it was lost; else whether
    messages wait in the thread's queue (read in the same statement: the
    worker that frees the thread starts the next only if there is one)."""
    connection = connection_for(ThreadLease)
    table, column = names(ThreadLease, connection)
    waiting, params = queue_open_expression(connection, resource_id=resource_id, thread_id=thread_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {column['expires_at']} = %(lapsed)s "
            f"WHERE {column['resource_id']} = %(resource)s AND {column['thread_id']} = %(thread)s "
            f"AND {column['turn_id']} = %(turn)s AND {column['token']} = %(token)s "
            f"AND {column['expires_at']} > %(now)s RETURNING {waiting}",
            {"lapsed": _stamp(connection, now - timedelta(seconds=1)), "resource": resource_id,
             "thread": thread_id, "turn": turn_id, "token": token, "now": _stamp(connection, now), **params})
        row = cursor.fetchone()
    return None if row is None else bool(row[0])


def _live_leases(connection, resource_id: str) -> tuple[str, dict]:
    """``(SELECT count(*) ...)`` of a resource's live leases (the running
    turns), to put in a statement, and its parameters. Uses the index
    ``(resource_id, expires_at)``."""
    table, column = names(ThreadLease, connection)
    return (f"(SELECT count(*) FROM {table} WHERE {column['resource_id']} = %(lease_resource)s "
            f"AND {column['expires_at']} > %(lease_now)s)",
            {"lease_resource": resource_id, "lease_now": _stamp(connection, timezone.now())})


def live_leases(*, resource_id: str) -> int:
    """How many turns of ``resource_id`` run now, on every worker: one ``SELECT``."""
    connection = connection_for(ThreadLease)
    sql, params = _live_leases(connection, resource_id)
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + sql, params)
        return int(cursor.fetchone()[0])


# --- turn starts (the database limiter) ------------------------------------------------


def turn_start_take(*, resource_id: str, turn_id: str, now_ms: int, cutoff_ms: int, rate: int,
                    first_slot: int, max_turns: int) -> int | None:
    """Count a turn's start in a free slot of its resource, if the resource
    started fewer than ``rate`` turns since ``cutoff_ms`` and (``max_turns``
    above 0) runs at most ``max_turns`` (see :mod:`chat_app.limits.db`): one
    statement. The slot taken, or None (refused, or the free slot was taken
    by another worker meanwhile)."""
    connection = connection_for(TurnStart)
    table, col = names(TurnStart, connection)
    columns, placeholders, params = insert_values(TurnStart, connection, {
        "resource_id": resource_id, "slot": Sql("n"), "turn_id": turn_id, "started_ms": now_ms})
    live = f"{col['resource_id']} = %(resource)s AND {col['started_ms']} > %(cutoff)s"
    running = ""
    if max_turns > 0:
        leases_sql, lease_params = _live_leases(connection, resource_id)
        running = f"AND {leases_sql} <= %(max_turns)s "
        params.update(lease_params, max_turns=max_turns)
    params.update(first=first_slot, rate=rate, resource=resource_id, cutoff=cutoff_ms)
    written = [name for name in columns if name not in (col["resource_id"], col["slot"])]
    with connection.cursor() as cursor:
        cursor.execute(
            # the slots from a random one on, wrapping around (racing
            # workers mostly try different ones); read only up to the first free one
            "WITH RECURSIVE free(k, n) AS (SELECT 1, %(first)s UNION ALL "
            "SELECT k + 1, (n + 1) %% %(rate)s FROM free WHERE k < %(rate)s) "
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(placeholders)} FROM free "
            f"WHERE n NOT IN (SELECT {col['slot']} FROM {table} WHERE {live}) "
            f"AND (SELECT count(*) FROM {table} WHERE {live}) < %(rate)s "
            + running
            + "LIMIT 1 "
            f"ON CONFLICT ({col['resource_id']}, {col['slot']}) DO UPDATE SET "
            + ", ".join(f"{name} = excluded.{name}" for name in written)
            + f" WHERE {table}.{col['started_ms']} <= %(cutoff)s RETURNING {col['slot']}",
            params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def turn_start_counts(*, resource_id: str, cutoff_ms: int, max_turns: int) -> tuple[int, int | None, int]:
    """Why a start was refused: the resource's starts since ``cutoff_ms``,
    the oldest of them (ms) and (``max_turns`` above 0, else 0) its running
    turns. One ``SELECT``."""
    connection = connection_for(TurnStart)
    table, col = names(TurnStart, connection)
    params = {"resource": resource_id, "cutoff": cutoff_ms}
    running = "0"
    if max_turns > 0:
        running, lease_params = _live_leases(connection, resource_id)
        params.update(lease_params)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*), min({col['started_ms']}), {running} FROM {table} "
            f"WHERE {col['resource_id']} = %(resource)s AND {col['started_ms']} > %(cutoff)s", params)
        return cursor.fetchone()


def turn_start_prune(*, before_ms: int) -> int:
    """Delete every start at or before ``before_ms``: one ``DELETE``."""
    connection = connection_for(TurnStart)
    table, col = names(TurnStart, connection)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE {col['started_ms']} <= %(before)s", {"before": before_ms})
        return cursor.rowcount


def turn_start_delete(*, resource_id: str, slot: int, turn_id: str) -> int:
    """Uncount a start (its slot, if still this turn's): one ``DELETE``."""
    connection = connection_for(TurnStart)
    table, col = names(TurnStart, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table} WHERE {col['resource_id']} = %(resource)s AND {col['slot']} = %(slot)s "
            f"AND {col['turn_id']} = %(turn)s",
            {"resource": resource_id, "slot": slot, "turn": turn_id})
        return cursor.rowcount


# --- the queue of a busy thread (contract §12) ------------------------------------------


def queue_open_expression(connection, *, resource_id: str, thread_id: str) -> tuple[str, dict]:
    """``EXISTS (...)``: messages wait in the thread's queue (or one's turn
    is starting), to put in another statement (the lease's release, a
    message's mapping read), and its parameters. Uses the index
    ``(resource_id, thread_id, state, ...)``."""
    from .models import QueuedMessage

    table, column = names(QueuedMessage, connection)
    return (f"EXISTS (SELECT 1 FROM {table} WHERE {column['resource_id']} = %(queue_resource)s "
            f"AND {column['thread_id']} = %(queue_thread)s "
            f"AND {column['state']} IN (%(queue_waiting)s, %(queue_starting)s))",
            {"queue_resource": resource_id, "queue_thread": thread_id,
             "queue_waiting": QueuedMessage.WAITING, "queue_starting": QueuedMessage.STARTING})
