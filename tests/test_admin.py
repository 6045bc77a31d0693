"""The admin for ``SessionMapping``: listing, search, filter, read-only ids,
deletes through the session service, no adding."""

import re
from datetime import timedelta
from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from sessions_app import services
from sessions_app.models import SessionMapping
from tests.helpers import save

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:sessions_app_sessionmapping_changelist"


@pytest.fixture
def rows():
    now = timezone.now()
    data = [
        # thread, resource, session, agent, first message, minutes ago
        ("thread-a", "alice", "sess-111", "smart", "How do I bake bread?", 30),
        ("thread-b", "alice", "sess-222", "datadog", "Why is p99 latency up?", 10),
        ("thread-c", "bob", "sess-333", "correlator", "Did the deploy cause it?", 20),
        ("thread-d", "bob", "sess-444", "datadog", "Show error logs", 40),
    ]
    made = {}
    for thread, resource, session, agent, message, age in data:
        made[thread] = save(thread, resource, session, agent=agent, user_message=message)
        SessionMapping.objects.filter(pk=made[thread].pk).update(
            updated_at=now - timedelta(minutes=age)
        )
    return made


def changelist(admin_client, **query):
    response = admin_client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200
    return response


def listed(response) -> list[str]:
    return [m.thread_id for m in response.context["cl"].result_list]


def test_changelist_lists_mappings_newest_first_with_the_columns(admin_client, rows):
    response = changelist(admin_client)
    assert listed(response) == ["thread-b", "thread-c", "thread-a", "thread-d"]
    html = response.content.decode()
    headers = re.findall(r'<th scope="col"[^>]*class="[^"]*column-(\w+)', html)
    assert headers == [
        "thread_id", "resource_id", "session_id", "agent", "title", "message_count", "updated_at",
    ]
    for text in ("thread-a", "alice", "sess-111", "datadog", "How do I bake bread?"):
        assert text in html


@pytest.mark.parametrize(
    "q, expected",
    [
        ("thread-c", ["thread-c"]),  # thread id
        ("bob", ["thread-c", "thread-d"]),  # resource id
        ("sess-444", ["thread-d"]),  # session id
        ("latency", ["thread-b"]),  # title
        ("nothing-matches", []),
    ],
)
def test_search(admin_client, rows, q, expected):
    assert listed(changelist(admin_client, q=q)) == expected


def test_filter_by_agent(admin_client, rows):
    response = changelist(admin_client, agent="datadog")
    assert listed(response) == ["thread-b", "thread-d"]
    assert listed(changelist(admin_client, agent="smart")) == ["thread-a"]
    html = response.content.decode()
    assert "By agent" in html or "by agent" in html


def test_change_page_shows_ids_read_only(admin_client, rows):
    mapping = rows["thread-a"]
    url = reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    for field in ("thread_id", "resource_id", "session_id", "created_at", "updated_at", "message_count"):
        assert not re.search(rf'<(input|textarea|select)[^>]*name="{field}"', html), field
    for value in ("thread-a", "alice", "sess-111"):
        assert value in html
    form = response.context["adminform"].form
    assert not {"thread_id", "resource_id", "session_id"} & set(form.fields)


def test_posting_the_change_form_cannot_rewrite_ids(admin_client, rows):
    mapping = rows["thread-a"]
    url = reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk])
    response = admin_client.post(
        url,
        {
            "thread_id": "hijacked",
            "resource_id": "mallory",
            "session_id": "sess-evil",
            "agent": "smart",
            "title": "Renamed",
            "last_message": "x",
        },
    )
    assert response.status_code == 302, response.content
    mapping.refresh_from_db()
    assert (mapping.thread_id, mapping.resource_id, mapping.session_id) == (
        "thread-a", "alice", "sess-111",
    )
    assert mapping.title == "Renamed"


def test_no_add_permission(admin_client, rows):
    assert admin_client.get(reverse("admin:sessions_app_sessionmapping_add")).status_code == 403
    html = changelist(admin_client).content.decode()
    assert reverse("admin:sessions_app_sessionmapping_add") not in html


def test_single_delete_goes_through_the_service(admin_client, rows, chat_log):
    mapping = rows["thread-c"]
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[mapping.pk])
    assert admin_client.get(url).status_code == 200  # the confirmation page
    with mock.patch.object(services, "delete_session", wraps=services.delete_session) as spy:
        response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    spy.assert_called_once_with("thread-c", "bob")
    assert not SessionMapping.objects.filter(pk=mapping.pk).exists()
    assert SessionMapping.objects.count() == 3
    assert any(
        r.getMessage().startswith("[CHAT] Deleted session mapping") and "thread-c" in r.getMessage()
        for r in chat_log.records
    )


def test_bulk_delete_goes_through_the_service(admin_client, rows, chat_log):
    chosen = [rows["thread-a"], rows["thread-d"]]
    data = {
        "action": "delete_selected",
        "_selected_action": [m.pk for m in chosen],
    }
    confirm = admin_client.post(reverse(CHANGELIST), data)
    assert confirm.status_code == 200  # the confirmation page
    assert SessionMapping.objects.count() == 4
    with mock.patch.object(services, "delete_session", wraps=services.delete_session) as spy:
        response = admin_client.post(reverse(CHANGELIST), {**data, "post": "yes"})
    assert response.status_code == 302
    assert sorted(c.args for c in spy.call_args_list) == [("thread-a", "alice"), ("thread-d", "bob")]
    assert sorted(SessionMapping.objects.values_list("thread_id", flat=True)) == [
        "thread-b", "thread-c",
    ]
    deleted = [
        r.getMessage() for r in chat_log.records
        if r.getMessage().startswith("[CHAT] Deleted session mapping")
    ]
    assert len(deleted) == 2


def test_admin_needs_staff(client, rows, django_user_model):
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 302 and "/login/" in response["Location"]
    user = django_user_model.objects.create_user("plain", password="pw-plain-123")
    client.force_login(user)
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 302 and "/login/" in response["Location"]
