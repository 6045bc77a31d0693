"""The plain SQL of the hot path (``sessions_app/sql.py``, ``chat_app/sql.py``)
held to the ORM: for the same inputs a raw write and the ORM's leave the same
row (every column compared); a field added to a model with a default does not
break a raw insert; a retried finish writes one record and counts its cost
once; a budget override saved anywhere applies at the next check. Run on
every engine (the embedded default, PostgreSQL with ``DATABASE_URL``)."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.db import connection, models
from django.db.models import F
from django.utils import timezone

from chat_app import sql as chat_sql
from chat_app.models import ThreadLease, TurnStart
from sessions_app import selectors, services, sql, usage
from sessions_app.models import ResourceBudget, SessionMapping, TranscriptEntry, TranscriptSummary, TurnRecord

pytestmark = pytest.mark.django_db(transaction=True)

NOW = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


@pytest.fixture
def frozen():
    """One instant for the raw write and the ORM's (``auto_now`` fields)."""
    with mock.patch.object(timezone, "now", return_value=NOW):
        yield NOW


def row(model, pk, *ignore: str) -> dict:
    """Every column of a row but the primary key and ``ignore``."""
    values = model.objects.filter(pk=pk).values().get()
    return {k: v for k, v in values.items() if k not in ("id", *ignore)}


def record(turn_id: str, thread_id: str = "t1", *, cost: str = "0.25", **more) -> dict:
    return {"turn_id": turn_id, "resource_id": "alice", "thread_id": thread_id, "agent": "smart",
            "model": "offline", "started_at": NOW - timedelta(seconds=3), "duration_ms": 3000,
            "first_text_ms": 120, "outcome": "done", "worker": "w1", "input_tokens": 11,
            "output_tokens": 22, "cache_read_tokens": 33, "cache_write_tokens": 44,
            "cost_usd": cost, **more}


def mapping(thread_id: str, **fields) -> SessionMapping:
    return SessionMapping.objects.create(thread_id=thread_id, resource_id="alice", session_id="s0",
                                         title=fields.pop("title", ""), **fields)


# --- raw writes and the ORM's: the same rows ------------------------------------------


@pytest.mark.parametrize("given", [
    record("r"),
    {"turn_id": "r", "resource_id": "alice", "thread_id": "t1", "started_at": NOW, "outcome": "done"},
], ids=["every-field", "defaults"])
def test_the_raw_turn_record_is_the_orms_row(frozen, given):
    fields = usage.record_fields(given)
    assert sql.turn_record_insert(fields) is True
    orm = TurnRecord.objects.create(**{**fields, "turn_id": "o"})
    raw = TurnRecord.objects.get(turn_id="r")
    assert row(TurnRecord, raw.pk, "turn_id") == row(TurnRecord, orm.pk, "turn_id")


def test_the_raw_finish_updates_the_mapping_as_the_orm_does(frozen):
    raw, orm = mapping("raw", message_count=2, agent="smart"), mapping("orm", message_count=2, agent="smart")
    services.finish_turn_sync("raw", "alice", "s1", agent="datadog", user_message="  Hello\n there ",
                              assistant_message="Hi!", turn_record=record("r", "raw"))
    # the ORM's update for the same inputs (the title only while empty, F() increments)
    fields = usage.record_fields(record("o", "orm"))
    TurnRecord.objects.create(**fields)
    SessionMapping.objects.filter(pk=orm.pk).update(
        session_id="s1", updated_at=timezone.now(), message_count=F("message_count") + 2,
        version=F("version") + 1, agent="datadog", last_message="Hi!", title="Hello there",
        cost_usd=F("cost_usd") + fields["cost_usd"])
    assert row(SessionMapping, raw.pk, "thread_id") == row(SessionMapping, orm.pk, "thread_id")
    assert row(SessionMapping, raw.pk)["cost_usd"] == Decimal("0.25")
    assert (row(TurnRecord, TurnRecord.objects.get(turn_id="r").pk, "turn_id", "thread_id")
            == row(TurnRecord, TurnRecord.objects.get(turn_id="o").pk, "turn_id", "thread_id"))
    # a titled thread keeps its title; no message: no title, no preview
    services.finish_turn_sync("raw", "alice", "s2", user_message="Another question")
    services.finish_turn_sync("raw", "alice", "s3")
    after = SessionMapping.objects.get(pk=raw.pk)
    assert (after.title, after.last_message, after.message_count, after.version, after.session_id) == (
        "Hello there", "Another question", 5, 4, "s3")


def test_save_session_and_the_finish_are_one_update(frozen):
    """``save_session`` of an existing thread runs the finish's update: same row."""
    mapping("a"), mapping("b")
    services.finish_turn_sync("a", "alice", "s1", agent="x", user_message="Q", assistant_message="A")
    saved = services._save_session("b", "alice", "s1", "x", "Q", "A", None, False)
    assert saved.message_count == 2 and saved.version == 2
    assert row(SessionMapping, SessionMapping.objects.get(thread_id="a").pk, "thread_id") == row(
        SessionMapping, saved.pk, "thread_id")
    with pytest.raises(services.ThreadDeleted):
        services._save_session("gone", "alice", "s1", None, "Q", None, None, False)


def test_the_lease_release_and_a_messages_read_say_whether_messages_wait_in_the_queue(frozen):
    """One statement each (contract §12): the worker freeing a thread learns
    whether to start its next queued message; a message learns it must not
    jump the queue."""
    from chat_app.models import QueuedMessage

    holder = {"host": "h", "host_id": "hid", "pid": 42, "pid_started": 4242}
    expires = NOW + timedelta(seconds=30)

    def take(token):
        assert chat_sql.lease_take(resource_id="alice", thread_id="q", turn_id=f"t{token}", now=NOW,
                                   expires=expires, **holder) == token

    def release(token):
        return chat_sql.lease_release_if_held(resource_id="alice", thread_id="q", turn_id=f"t{token}",
                                              token=token, now=NOW + timedelta(seconds=1))

    def waiting_seen():
        also = lambda conn: chat_sql.queue_open_expression(conn, resource_id="alice", thread_id="q")  # noqa: E731
        return bool(selectors.turn_mapping_and_budget_sync("q", "alice", also)[2])

    take(1)
    assert release(1) is False and not waiting_seen()
    ThreadLease.objects.filter(thread_id="q").update(expires_at=NOW - timedelta(seconds=1))
    take(2)
    row = QueuedMessage.objects.create(queue_id="q-1", resource_id="alice", thread_id="q", turn_id="t",
                                       mode="enqueue", created_at=NOW)
    QueuedMessage.objects.create(queue_id="q-2", resource_id="alice", thread_id="other", turn_id="t2",
                                 mode="enqueue", created_at=NOW)
    assert waiting_seen()
    assert release(2) is True
    assert release(2) is None  # not held any more
    QueuedMessage.objects.filter(pk=row.pk).update(state="started")
    assert not waiting_seen()


def test_the_raw_lease_row_is_the_orms_row(frozen):
    holder = {"host": "h", "host_id": "hid", "pid": 42, "pid_started": 4242}
    expires = NOW + timedelta(seconds=30)
    assert chat_sql.lease_take(resource_id="alice", thread_id="raw", turn_id="turn-1", now=NOW,
                               expires=expires, **holder) == 1
    orm = ThreadLease.objects.create(resource_id="alice", thread_id="orm", turn_id="turn-1", token=1,
                                     expires_at=expires, **holder)
    raw = ThreadLease.objects.get(thread_id="raw")
    assert row(ThreadLease, raw.pk, "thread_id") == row(ThreadLease, orm.pk, "thread_id")
    # a live lease is not taken; an expired one is taken over: token + 1, the rest rewritten
    assert chat_sql.lease_take(resource_id="alice", thread_id="raw", turn_id="turn-2", now=NOW,
                               expires=expires, host="x", host_id="y", pid=1, pid_started=1) is None
    later = expires + timedelta(seconds=1)
    other = {"host": "h2", "host_id": "hid2", "pid": 7, "pid_started": 77}
    assert chat_sql.lease_take(resource_id="alice", thread_id="raw", turn_id="turn-2", now=later,
                               expires=later + timedelta(seconds=30), **other) == 2
    ThreadLease.objects.filter(pk=orm.pk).update(token=F("token") + 1, turn_id="turn-2",
                                                 expires_at=later + timedelta(seconds=30), **other)
    assert row(ThreadLease, raw.pk, "thread_id") == row(ThreadLease, orm.pk, "thread_id")
    # the release lets it lapse a second ago, as Lease.release_sync's ORM update does
    assert chat_sql.lease_release_if_held(resource_id="alice", thread_id="raw", turn_id="turn-2", token=2,
                                          now=NOW + timedelta(seconds=40)) is False  # held; no queue waits
    ThreadLease.objects.filter(pk=orm.pk).update(expires_at=NOW + timedelta(seconds=39))
    assert row(ThreadLease, raw.pk, "thread_id") == row(ThreadLease, orm.pk, "thread_id")


def test_the_raw_limit_row_is_the_orms_row():
    now_ms = 1_700_000_000_000
    slot = chat_sql.turn_start_take(resource_id="raw", turn_id="turn-1", now_ms=now_ms,
                                    cutoff_ms=now_ms - 60_000, rate=1, first_slot=0, max_turns=3)
    assert slot == 0
    orm = TurnStart.objects.create(resource_id="orm", slot=0, turn_id="turn-1", started_ms=now_ms)
    raw = TurnStart.objects.get(resource_id="raw")
    assert row(TurnStart, raw.pk, "resource_id") == row(TurnStart, orm.pk, "resource_id")
    # the window is full: refused, and the counts say why
    assert chat_sql.turn_start_take(resource_id="raw", turn_id="turn-2", now_ms=now_ms + 1,
                                    cutoff_ms=now_ms + 1 - 60_000, rate=1, first_slot=0, max_turns=3) is None
    assert tuple(chat_sql.turn_start_counts(resource_id="raw", cutoff_ms=now_ms - 60_000, max_turns=3)) == (
        1, now_ms, 0)
    assert chat_sql.turn_start_delete(resource_id="raw", slot=0, turn_id="turn-1") == 1
    assert chat_sql.turn_start_prune(before_ms=now_ms) == 1  # the ORM's row, as old
    assert not TurnStart.objects.exists()


def test_the_raw_transcript_summary_and_lines_are_the_orms_rows():
    assert sql.summary_insert(connection, project_key="p", session_id="raw", mtime_ms=5, data='{"a": 1}')
    assert not sql.summary_insert(connection, project_key="p", session_id="raw", mtime_ms=6, data="x")
    orm = TranscriptSummary.objects.create(project_key="p", session_id="orm", mtime_ms=5, data='{"a": 1}')
    raw = TranscriptSummary.objects.get(session_id="raw")
    assert row(TranscriptSummary, raw.pk, "session_id") == row(TranscriptSummary, orm.pk, "session_id")
    pk, mtime, data = sql.summary_lock(connection, project_key="p", session_id="new")
    assert (mtime, data) == (0, "")
    sql.summary_update(connection, pk=pk, mtime_ms=9, data="{}")
    TranscriptSummary.objects.filter(pk=orm.pk).update(mtime_ms=9, data="{}")
    assert row(TranscriptSummary, pk, "session_id") == row(TranscriptSummary, orm.pk, "session_id")

    stamp = connection.ops.adapt_datetimefield_value(NOW)
    sql.transcript_insert(connection, names_given=("project_key", "session_id", "uuid", "data", "created_at"),
                          rows=[("p", "raw", "u1", '{"x": 1}', stamp)])
    orm_line = TranscriptEntry.objects.create(project_key="p", session_id="orm", uuid="u2", data='{"x": 1}',
                                              created_at=NOW)
    raw_line = TranscriptEntry.objects.get(session_id="raw")
    assert raw_line.subpath == ""  # not given: the field's default
    assert row(TranscriptEntry, raw_line.pk, "session_id", "uuid") == row(
        TranscriptEntry, orm_line.pk, "session_id", "uuid")


# --- a new field with a default -------------------------------------------------------


@contextmanager
def added_field(model, name: str, field: models.Field):
    """``model`` with one more NOT NULL column (as a migration would add it)."""
    field.contribute_to_class(model, name)
    try:
        with connection.schema_editor() as editor:
            editor.add_field(model, field)
        try:
            yield field
        finally:
            with connection.schema_editor() as editor:
                editor.remove_field(model, field)
    finally:
        model._meta.local_fields.remove(field)
        delattr(model, field.attname)
        model._meta._expire_cache()


def test_a_new_field_with_a_default_does_not_break_the_raw_inserts(frozen):
    mapping("t1")
    with added_field(TurnRecord, "retries", models.PositiveIntegerField(default=3)), \
            added_field(ThreadLease, "zone", models.CharField(max_length=16, default="eu")), \
            added_field(TurnStart, "weight", models.IntegerField(default=1)):
        services.finish_turn_sync("t1", "alice", "s1", user_message="Q", turn_record=record("r1"))
        assert TurnRecord.objects.values_list("retries", flat=True).get(turn_id="r1") == 3
        assert chat_sql.lease_take(resource_id="alice", thread_id="t1", turn_id="x", now=NOW,
                                   expires=NOW + timedelta(seconds=30), host="h", host_id="i", pid=1,
                                   pid_started=2) == 1
        assert ThreadLease.objects.values_list("zone", flat=True).get(thread_id="t1") == "eu"
        assert chat_sql.turn_start_take(resource_id="alice", turn_id="x", now_ms=1, cutoff_ms=-59_999,
                                        rate=2, first_slot=1, max_turns=0) == 1
        assert TurnStart.objects.values_list("weight", flat=True).get() == 1


# --- idempotent finish ----------------------------------------------------------------


def test_a_retried_finish_writes_one_record_and_counts_its_cost_once():
    mapping("t1")
    for _ in range(2):
        services.finish_turn_sync("t1", "alice", "s1", user_message="Q", assistant_message="A",
                                  turn_record=record("turn-1", cost="0.25"))
    assert TurnRecord.objects.filter(turn_id="turn-1").count() == 1
    assert SessionMapping.objects.get(thread_id="t1").cost_usd == Decimal("0.25")
    # the runner's fallback record of a turn already recorded counts nothing either
    usage.record_turn_sync(record("turn-1", cost="0.25"))
    usage.record_turn_sync(record("turn-2", cost="0.5"))
    usage.record_turn_sync(record("turn-2", cost="0.5"))
    assert TurnRecord.objects.count() == 2
    assert SessionMapping.objects.get(thread_id="t1").cost_usd == Decimal("0.75")


def test_a_finish_on_a_deleted_thread_writes_no_record():
    with pytest.raises(services.ThreadDeleted):
        services.finish_turn_sync("gone", "alice", "s1", turn_record=record("turn-1"))
    assert not TurnRecord.objects.exists()


# --- budget overrides reach every worker at once ---------------------------------------


def test_a_budget_override_saved_anywhere_applies_at_the_next_check(settings, django_assert_num_queries):
    """The override is saved through the ORM, as another worker's admin
    would: no hook of this process runs, and no cache can be stale."""
    settings.OMNI_DAILY_BUDGET_USD = 0
    mapping("t1")
    for n, cost in enumerate(("0.1", "0.2")):
        TurnRecord.objects.create(**usage.record_fields(record(f"turn-{n}", cost=cost, started_at=timezone.now())))
    with django_assert_num_queries(1):  # the override and the day's spend together
        assert usage.check_budget_sync("alice") is None  # no cap
    budget = ResourceBudget.objects.create(resource_id="alice", daily_usd=Decimal("1"))
    assert usage.check_budget_sync("alice") == Decimal("0.7")  # exact: 1 - (0.1 + 0.2)
    ResourceBudget.objects.filter(pk=budget.pk).update(daily_usd=Decimal("0.3"))
    with pytest.raises(usage.BudgetExceeded):
        usage.check_budget_sync("alice")
    ResourceBudget.objects.filter(pk=budget.pk).update(daily_usd=None)  # no cap for alice
    settings.OMNI_DAILY_BUDGET_USD = 0.01
    assert usage.check_budget_sync("alice") is None
    assert usage.budget_for_sync("alice") is None
    budget.delete()  # the default applies again
    with pytest.raises(usage.BudgetExceeded):
        usage.check_budget_sync("alice")
    assert usage.check_budget_sync("bob") == Decimal("0.01")


def test_a_messages_one_select_reads_what_the_two_reads_do(settings, django_assert_num_queries):
    """The warm path reads the thread's mapping and the budget's state in
    one ``SELECT``: the same answers as the mapping's read and the budget's
    check on their own, with and without a mapping, an override, a cap."""
    settings.OMNI_DAILY_BUDGET_USD = 0.5
    mapping("t1", version=4, agent="smart", forked_from_thread_id="t0")
    TurnRecord.objects.create(**usage.record_fields(record("turn-1", cost="0.2", started_at=timezone.now())))
    cases = [("t1", "alice"), ("t2", "alice"), ("t1", "bob")]
    for override in (None, Decimal("0"), Decimal("0.1")):
        if override is not None:
            ResourceBudget.objects.update_or_create(resource_id="alice", defaults={"daily_usd": override})
        for thread, resource in cases:
            with django_assert_num_queries(1):
                both = selectors.turn_mapping_and_budget_sync(thread, resource)
            state = sql.budget_state(resource_id=resource, day=usage.today(), default_caps=True)
            assert both == (selectors.turn_mapping_sync(thread, resource), state), (override, thread, resource)
    assert selectors.turn_mapping_and_budget_sync("t1", "alice")[0].version == 4


# --- the same statements over a libSQL server (Hrana) ------------------------------------

REMOTE_SCRIPT = """
from datetime import UTC, datetime
from decimal import Decimal
from django.db import connection
from django.utils import timezone
from sessions_app import selectors, services, sql, usage
from sessions_app.models import ResourceBudget, SessionMapping, TurnRecord
SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s0")
rec = {"turn_id": "turn-1", "resource_id": "alice", "thread_id": "t1", "started_at": timezone.now(),
       "outcome": "done", "cost_usd": "0.25"}
for _ in range(2):
    services.finish_turn_sync("t1", "alice", "s1", user_message="Q", assistant_message="A", turn_record=rec)
m = SessionMapping.objects.get()
print("FINISH", TurnRecord.objects.count(), m.cost_usd, m.message_count, m.version, m.title)
print("MAPPING", selectors.turn_mapping_sync("t1", "alice").version,
      selectors.turn_mapping_and_budget_sync("t1", "alice")[0].version)
ResourceBudget.objects.create(resource_id="alice", daily_usd=Decimal("1"))
print("LEFT", usage.check_budget_sync("alice"))
pk, mtime, data = sql.summary_lock(connection, project_key="p", session_id="s1")
sql.summary_update(connection, pk=pk, mtime_ms=7, data="{}")
sql.transcript_insert(connection, names_given=("project_key", "session_id", "uuid", "data", "created_at"),
                      rows=[("p", "s1", "u1", "{}", connection.ops.adapt_datetimefield_value(timezone.now()))])
print("SUMMARY", sql.summary_lock(connection, project_key="p", session_id="s1")[1:])
"""


@pytest.mark.engine_agnostic
def test_the_statements_over_a_libsql_server(tmp_path):
    from tests.test_engine_remote import on_a_libsql_server, output

    proc = on_a_libsql_server(tmp_path, REMOTE_SCRIPT)
    assert proc.stdout.split("\n")[:4] == [
        "FINISH 1 0.25000000 4 3 Q", "MAPPING 3 3", "LEFT 0.75000000", "SUMMARY (7, '{}')"], output(proc)
