"""Every plain SQL statement of sessions_app, and the helpers that build them
(chat_app's are in ``chat_app/sql.py``, on the same helpers).

Plain SQL, not the ORM, for the statements a turn runs every time (the
mapping, the turn's record, the transcript's summary and lines, the budget
check): there, building an ORM query costs more CPU than running it. Each
statement is one function with keyword parameters that runs it and returns
what its caller needs; the callers keep their logic.

Names come from the models' metadata and values go through the fields' own
adaptation, so the SQL stays what the ORM would send. An ``INSERT`` lists
every concrete field of its model (:func:`insert_values`): a field the
caller does not give takes its default as ``Model.objects.create()`` would
(``get_default()``, now for ``auto_now``/``auto_now_add``; a ``db_default``
is left to the database), so a new field with a default cannot break a raw
insert. ``tests/test_sql.py`` holds each raw write to the ORM's row for the
same inputs. Parameters are named (``%(name)s``: psycopg 3 and the libSQL
engine both take them).
"""

from __future__ import annotations

from datetime import date
from decimal import Context, Decimal

from django.db import connections, router, transaction
from django.db.models import NOT_PROVIDED, AutoField, DateTimeField
from django.utils import timezone

from .models import HealthBeat, ResourceBudget, SessionMapping, TranscriptEntry, TranscriptSummary, TurnRecord

# --- helpers ---------------------------------------------------------------------------


def names(model, connection) -> tuple[str, dict[str, str]]:
    """``model``'s table and its columns (by field name), quoted for ``connection``."""
    quote = connection.ops.quote_name
    return quote(model._meta.db_table), {f.name: quote(f.column) for f in model._meta.concrete_fields}


def db_value(model, name: str, value, connection):
    """``value`` as the database takes it for ``model``'s field ``name``."""
    return model._meta.get_field(name).get_db_prep_save(value, connection)


class Sql(str):
    """A value of :func:`insert_values` that is an SQL expression, written as is."""


def default_value(field):
    """What ``Model.objects.create()`` writes for ``field`` when not given, or
    ``NOT_PROVIDED`` for a ``db_default`` (the database fills it in)."""
    if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        return timezone.now() if isinstance(field, DateTimeField) else date.today()
    if field.db_default is not NOT_PROVIDED and not field.has_default():
        return NOT_PROVIDED
    return field.get_default()


_plans: dict = {}


def _plan(model, connection) -> list[tuple]:
    """``(field, name, quoted column, parameter, placeholder)`` of each concrete
    field of ``model`` but the automatic primary key (kept per model and
    engine, until the model's fields change: a turn builds its inserts
    without looking its fields up again)."""
    fields = model._meta.concrete_fields  # a new tuple whenever the model's fields change
    kept = _plans.get((model, connection.vendor))
    if kept is None or kept[0] is not fields:
        quote = connection.ops.quote_name
        kept = _plans[model, connection.vendor] = (fields, [
            (f, f.name, quote(f.column), f"v_{f.name}", f"%(v_{f.name})s")
            for f in fields if not isinstance(f, AutoField)])
    return kept[1]


def insert_values(model, connection, given: dict):
    """The columns, placeholders and parameters of one row of ``model``:
    every concrete field but the automatic primary key, ``given[name]`` or
    the field's default (:func:`default_value`). A :class:`Sql` value is an
    expression written in place of its placeholder. Parameters are named
    ``v_`` + the field's name."""
    columns, placeholders, params = [], [], {}
    for field, name, column, key, placeholder in _plan(model, connection):
        if name in given:
            value = given[name]
            if value.__class__ is Sql:
                columns.append(column)
                placeholders.append(value)
                continue
        else:
            value = default_value(field)
            if value is NOT_PROVIDED:
                continue
        columns.append(column)
        placeholders.append(placeholder)
        params[key] = field.get_db_prep_save(value, connection)
    return columns, placeholders, params


def connection_for(model, connection=None, *, write: bool = True):
    """``connection``, else the model's (the primary when ``write``: no replica lag)."""
    if connection is not None:
        return connection
    alias = router.db_for_write(model) if write else router.db_for_read(model)
    return connections[alias]


# --- the mapping -----------------------------------------------------------------------


def mapping_for_turn(*, thread_id: str, resource_id: str, fields: list[str]) -> tuple | None:
    """The thread's mapping's ``fields`` (a turn reads them before it
    starts), or None: one ``SELECT``."""
    connection = connection_for(SessionMapping, write=False)
    table, column = names(SessionMapping, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(column[name] for name in fields)} FROM {table} "
            f"WHERE {column['thread_id']} = %(thread)s AND {column['resource_id']} = %(resource)s",
            {"thread": thread_id, "resource": resource_id})
        return cursor.fetchone()


def mapping_turn_update(*, thread_id: str, resource_id: str, session_id: str, added: int,
                        agent: str | None = None, last_message: str | None = None,
                        title: str | None = None, cost_usd: Decimal | None = None) -> bool:
    """A turn's update of its thread's mapping: ``session_id`` and
    ``updated_at`` set, ``message_count`` + ``added``, ``version`` + 1, and
    only when given ``agent``, ``last_message``, ``title`` (set only while
    empty) and ``cost_usd`` (added). One ``UPDATE``; False if the mapping
    is gone."""
    connection = connection_for(SessionMapping)
    table, column = names(SessionMapping, connection)
    sets = [f"{column['session_id']} = %(session)s", f"{column['updated_at']} = %(now)s",
            f"{column['message_count']} = {column['message_count']} + %(added)s",
            f"{column['version']} = {column['version']} + 1"]
    params = {"session": session_id, "added": added, "thread": thread_id, "resource": resource_id,
              "now": db_value(SessionMapping, "updated_at", timezone.now(), connection)}
    if agent:
        sets.append(f"{column['agent']} = %(agent)s")
        params["agent"] = agent
    if last_message:
        sets.append(f"{column['last_message']} = %(last)s")
        params["last"] = last_message
    if title:
        sets.append(f"{column['title']} = CASE WHEN {column['title']} = '' THEN %(title)s "
                    f"ELSE {column['title']} END")
        params["title"] = title
    if cost_usd:
        sets.append(f"{column['cost_usd']} = {column['cost_usd']} + %(cost)s")
        params["cost"] = db_value(SessionMapping, "cost_usd", cost_usd, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {', '.join(sets)} "
            f"WHERE {column['thread_id']} = %(thread)s AND {column['resource_id']} = %(resource)s",
            params)
        return cursor.rowcount > 0


def mapping_add_cost(*, thread_id: str, resource_id: str, cost_usd: Decimal) -> int:
    """Add a turn's cost to its thread's total: one ``UPDATE``."""
    connection = connection_for(SessionMapping)
    table, column = names(SessionMapping, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {column['cost_usd']} = {column['cost_usd']} + %(cost)s "
            f"WHERE {column['thread_id']} = %(thread)s AND {column['resource_id']} = %(resource)s",
            {"cost": db_value(SessionMapping, "cost_usd", cost_usd, connection),
             "thread": thread_id, "resource": resource_id})
        return cursor.rowcount


# --- the turn's record -----------------------------------------------------------------


def turn_record_insert(record: dict) -> bool:
    """Insert a turn's record (``TurnRecord`` fields) unless its turn has one
    already: ``INSERT ... ON CONFLICT (turn_id) DO NOTHING RETURNING``. True
    if this call inserted it (so its cost is to be counted, once)."""
    connection = connection_for(TurnRecord)
    table, column = names(TurnRecord, connection)
    columns, placeholders, params = insert_values(TurnRecord, connection, record)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(placeholders)}) "
            f"ON CONFLICT ({column['turn_id']}) DO NOTHING RETURNING {column['id']}",
            params)
        return cursor.fetchone() is not None


def record_turn(record: dict) -> bool:
    """A turn's record and its thread's cost, idempotently together: the
    cost is added only if the record was inserted now, in one transaction
    (the caller's, if it has one). True if inserted."""
    with transaction.atomic(using=connection_for(TurnRecord).alias, savepoint=False):
        inserted = turn_record_insert(record)
        if inserted and record.get("cost_usd"):
            mapping_add_cost(thread_id=record["thread_id"], resource_id=record["resource_id"],
                             cost_usd=record["cost_usd"])
    return inserted


# --- budgets ---------------------------------------------------------------------------


BudgetState = tuple  # (has an override, its daily_usd, spent today)


def _budget_columns(connection) -> tuple[str, str]:
    """The override's id and amount, and the day's spend summed only when a
    cap applies (the override's amount above 0, or with no override
    ``%(default_caps)s``): three columns, and the ``LEFT JOIN`` of the
    resource's override they read."""
    budgets, b = names(ResourceBudget, connection)
    records, r = names(TurnRecord, connection)
    columns = (f"{budgets}.{b['id']}, {budgets}.{b['daily_usd']}, "
               f"CASE WHEN ({budgets}.{b['id']} IS NULL AND %(default_caps)s) OR {budgets}.{b['daily_usd']} > 0 "
               f"THEN (SELECT SUM({r['cost_usd']}) FROM {records} "
               f"WHERE {r['resource_id']} = %(resource)s AND {r['day']} = %(day)s) END")
    return columns, f"LEFT JOIN {budgets} ON {budgets}.{b['resource_id']} = %(resource)s"


def _budget_state(key, amount, spent) -> BudgetState:
    return (key is not None, _decimal(amount, ResourceBudget._meta.get_field("daily_usd")),
            _decimal(spent, TurnRecord._meta.get_field("cost_usd")) or Decimal(0))


def budget_state(*, resource_id: str, day: date, default_caps: bool) -> BudgetState:
    """The resource's budget override and what it spent on ``day``, in one
    ``SELECT``: ``(has an override, its daily_usd, spent)``. The spend is
    summed only when a cap applies: the override's amount above 0, or with
    no override ``default_caps`` (``OMNI_DAILY_BUDGET_USD`` above 0). Read
    at every check: an override saved by any worker applies at the next."""
    connection = connection_for(ResourceBudget, write=False)
    columns, join = _budget_columns(connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {columns} FROM (SELECT 1 AS one) one {join}",
            {"resource": resource_id, "day": db_value(TurnRecord, "day", day, connection),
             "default_caps": bool(default_caps)})
        return _budget_state(*cursor.fetchone())


def mapping_and_budget(*, thread_id: str, resource_id: str, fields: list[str], day: date,
                       default_caps: bool, also=None) -> tuple[tuple | None, BudgetState, object]:
    """A message's reads in one ``SELECT``: the thread's mapping's
    ``fields`` (None: no mapping; ``fields[0]`` must be a NOT NULL column),
    the resource's :func:`budget_state` and, given ``also`` (a caller's
    ``(expression, parameters)``, e.g. chat_app's "messages wait in the
    thread's queue"), that expression's value (else None)."""
    connection = connection_for(SessionMapping, write=False)
    table, column = names(SessionMapping, connection)
    budget_columns, budget_join = _budget_columns(connection)
    extra, extra_params = also(connection) if also is not None else ("NULL", {})
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(f'{table}.{column[name]}' for name in fields)}, {extra}, {budget_columns} "
            f"FROM (SELECT 1 AS one) one "
            f"LEFT JOIN {table} ON {table}.{column['thread_id']} = %(thread)s "
            f"AND {table}.{column['resource_id']} = %(resource)s {budget_join}",
            {"thread": thread_id, "resource": resource_id,
             "day": db_value(TurnRecord, "day", day, connection), "default_caps": bool(default_caps),
             **extra_params})
        row = cursor.fetchone()
    n = len(fields)
    mapping, value, budget = row[:n], row[n], row[n + 1:]
    return (None if mapping[0] is None else tuple(mapping)), _budget_state(*budget), value


def _decimal(value, field) -> Decimal | None:
    """A decimal column's value as the ORM reads it (SQLite hands back floats)."""
    if value is None or isinstance(value, Decimal):
        return value
    exact = Context(prec=15).create_decimal_from_float(value) if isinstance(value, float) else Decimal(value)
    return exact.quantize(Decimal(1).scaleb(-field.decimal_places))


# --- the transcript --------------------------------------------------------------------


def summary_lock(connection, *, project_key: str, session_id: str) -> tuple[int, int, str]:
    """The session's summary row ``(id, mtime_ms, data)``, locked until the
    transaction ends (``FOR UPDATE`` where the engine has it; SQLite/libSQL
    write transactions are exclusive already). A new session gets a
    placeholder row (``data == ""``) first, inserted with ``ON CONFLICT DO
    NOTHING`` so two first appends cannot both create it."""
    table, col = names(TranscriptSummary, connection)
    key = {"project": project_key, "session": session_id}
    select = (f"SELECT {col['id']}, {col['mtime_ms']}, {col['data']} FROM {table} "
              f"WHERE {col['project_key']} = %(project)s AND {col['session_id']} = %(session)s"
              + (" FOR UPDATE" if connection.features.has_select_for_update else ""))
    with connection.cursor() as cursor:
        cursor.execute(select, key)
        row = cursor.fetchone()
        if row is None:
            summary_insert(connection, project_key=project_key, session_id=session_id, mtime_ms=0, data="")
            cursor.execute(select, key)
            row = cursor.fetchone()
    return row


def summary_insert(connection, *, project_key: str, session_id: str, mtime_ms: int, data: str) -> bool:
    """Insert a session's summary row unless it has one: True if inserted."""
    table, col = names(TranscriptSummary, connection)
    columns, placeholders, params = insert_values(TranscriptSummary, connection, {
        "project_key": project_key, "session_id": session_id, "mtime_ms": mtime_ms, "data": data})
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(placeholders)}) "
            f"ON CONFLICT ({col['project_key']}, {col['session_id']}) DO NOTHING", params)
        return cursor.rowcount == 1


def summary_update(connection, *, pk: int, mtime_ms: int, data: str) -> None:
    table, col = names(TranscriptSummary, connection)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET {col['mtime_ms']} = %(mtime)s, {col['data']} = %(data)s "
                       f"WHERE {col['id']} = %(pk)s", {"mtime": mtime_ms, "data": data, "pk": pk})


def transcript_insert(connection, *, names_given: tuple[str, ...], rows: list[tuple]) -> None:
    """Insert transcript lines in list order, skipping duplicate uuids:
    multi-row ``INSERT OR IGNORE`` (SQLite/libSQL) or ``INSERT ... ON
    CONFLICT DO NOTHING`` (PostgreSQL), the SQL of ``bulk_create(
    ignore_conflicts=True)`` without its per-value compile cost (about 5x
    the insert itself at 500 rows). ``rows`` hold the values of the fields
    ``names_given`` as the database takes them; every other field takes its
    default (the same for every row). One statement per chunk (one round
    trip to a libSQL server or PostgreSQL). Rows take ``id`` values in
    VALUES order; a skipped duplicate leaves at most a gap, never a
    reordering."""
    from django.db.models.constants import OnConflict

    ops = connection.ops
    fields = [TranscriptEntry._meta.get_field(name) for name in names_given]
    rest = {f.name: default_value(f) for f in TranscriptEntry._meta.concrete_fields
            if f.name not in names_given and not isinstance(f, AutoField)}
    rest = {name: value for name, value in rest.items() if value is not NOT_PROVIDED}
    fields += [TranscriptEntry._meta.get_field(name) for name in rest]
    extra = tuple(db_value(TranscriptEntry, name, value, connection) for name, value in rest.items())
    head = "{} {} ({}) VALUES ".format(
        ops.insert_statement(on_conflict=OnConflict.IGNORE),
        ops.quote_name(TranscriptEntry._meta.db_table),
        ", ".join(ops.quote_name(field.column) for field in fields),
    )
    suffix = ops.on_conflict_suffix_sql(fields, OnConflict.IGNORE, None, None)
    placeholders = "({})".format(", ".join(["%s"] * len(fields)))
    per_statement = min(1000, (connection.features.max_query_params or 10**6) // len(fields))
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            cursor.execute(
                f"{head}{', '.join([placeholders] * len(chunk))} {suffix}".rstrip(),
                [value for row in chunk for value in (*row, *extra)],
            )


# --- health ------------------------------------------------------------------------------


def health_beat(*, now, lock_wait_ms: int) -> None:
    """Rewrite the health row (:class:`~sessions_app.models.HealthBeat`, ``id``
    1), committed: one upsert in autocommit, so it fails where the database
    cannot take a write (read-only, full). ``lock_wait_ms``: how long it
    waits for SQLite's write lock (a probe must not queue behind a turn's
    write for the file's usual 20 s); a lock still held raises
    ``OperationalError`` ("database is locked")."""
    connection = connection_for(HealthBeat)
    table, col = names(HealthBeat, connection)
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite" and not getattr(connection, "is_remote", False):
            cursor.execute(f"PRAGMA busy_timeout = {int(lock_wait_ms)}")
        cursor.execute(
            f"INSERT INTO {table} ({col['id']}, {col['written_at']}) VALUES (1, %(now)s) "
            f"ON CONFLICT ({col['id']}) DO UPDATE SET {col['written_at']} = excluded.{col['written_at']}",
            {"now": db_value(HealthBeat, "written_at", now, connection)})
