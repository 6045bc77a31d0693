"""``SessionMapping`` (contract §3): the unique pair, the listing index, defaults."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from sessions_app.models import SessionMapping

pytestmark = pytest.mark.django_db

TABLE = SessionMapping._meta.db_table


def constraints() -> dict:
    with connection.cursor() as cursor:
        return connection.introspection.get_constraints(cursor, TABLE)


def test_duplicate_thread_and_resource_is_rejected_by_the_database():
    SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    with pytest.raises(IntegrityError), transaction.atomic():
        SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s2")
    assert SessionMapping.objects.filter(thread_id="t1", resource_id="alice").count() == 1
    assert SessionMapping.objects.get(thread_id="t1", resource_id="alice").session_id == "s1"


def test_duplicate_is_rejected_even_by_a_bulk_insert():
    SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    with pytest.raises(IntegrityError), transaction.atomic():
        SessionMapping.objects.bulk_create(
            [SessionMapping(thread_id="t1", resource_id="alice", session_id="s9")]
        )


def test_same_thread_id_under_another_resource_is_a_different_mapping():
    SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    SessionMapping.objects.create(thread_id="t1", resource_id="bob", session_id="s2")
    assert {m.resource_id: m.session_id for m in SessionMapping.objects.filter(thread_id="t1")} == {
        "alice": "s1",
        "bob": "s2",
    }


def test_unique_constraint_on_thread_and_resource_exists_in_the_database():
    unique = [
        c for c in constraints().values()
        if c["unique"] and not c["primary_key"] and c["columns"] == ["thread_id", "resource_id"]
    ]
    assert unique, constraints()


def test_index_on_resource_and_updated_at_descending_exists_in_the_database():
    indexes = [
        c for c in constraints().values()
        if c["index"] and c["columns"] == ["resource_id", "updated_at"]
    ]
    assert indexes, constraints()
    assert any(c.get("orders") == ["ASC", "DESC"] for c in indexes), indexes


def test_defaults():
    before = timezone.now()
    mapping = SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    mapping.refresh_from_db()
    assert mapping.agent == "smart"
    assert mapping.title == ""
    assert mapping.last_message == ""
    assert mapping.message_count == 0
    assert mapping.forked_from_thread_id is None
    assert timezone.is_aware(mapping.created_at) and timezone.is_aware(mapping.updated_at)
    assert before - timedelta(seconds=1) <= mapping.created_at <= timezone.now()
    assert abs(mapping.updated_at - mapping.created_at) < timedelta(seconds=1)


def test_saving_moves_updated_at_and_keeps_created_at():
    mapping = SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    past = timezone.now() - timedelta(days=1)
    SessionMapping.objects.filter(pk=mapping.pk).update(created_at=past, updated_at=past)
    mapping.refresh_from_db()
    mapping.session_id = "s2"
    mapping.save()
    mapping.refresh_from_db()
    assert mapping.created_at == past
    assert mapping.updated_at > past + timedelta(hours=23)


def test_default_ordering_is_newest_first():
    now = timezone.now()
    for i, age in enumerate([5, 1, 3]):
        m = SessionMapping.objects.create(thread_id=f"t{i}", resource_id="alice", session_id=f"s{i}")
        SessionMapping.objects.filter(pk=m.pk).update(updated_at=now - timedelta(minutes=age))
    assert [m.thread_id for m in SessionMapping.objects.all()] == ["t1", "t2", "t0"]


def test_message_count_cannot_be_negative():
    SessionMapping.objects.create(thread_id="t1", resource_id="alice", session_id="s1")
    with pytest.raises(IntegrityError), transaction.atomic():
        SessionMapping.objects.filter(thread_id="t1").update(message_count=-1)
