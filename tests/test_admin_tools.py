"""The admin of the tool-call audit (contract §9): the list (columns, filters,
search), a call's read-only page, the calls on their thread's page, no XSS from
what a tool was given or returned, and the calls going with their thread."""

import html
import json
import re
from datetime import timedelta
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from sessions_app import admin as sessions_admin
from sessions_app import services
from sessions_app.models import SessionMapping, ToolCall
from tests.helpers import save

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:sessions_app_toolcall_changelist"
XSS_INPUT = {"query": "<script>alert('in')</script>", "note": '<img src=x onerror="alert(1)">'}
XSS_RESULT = "<script>alert('out')</script> & <b>bold</b>"


def make_call(mapping, tool_use_id, tool, minutes_ago, *, tool_input=None, **fields) -> ToolCall:
    call = ToolCall.objects.create(
        mapping=mapping, resource_id=mapping.resource_id, thread_id=mapping.thread_id,
        session_id=mapping.session_id, tool_use_id=tool_use_id, tool=tool,
        input=json.dumps(tool_input or {}, ensure_ascii=False),
        **{"turn_id": f"turn-{tool_use_id}", "status": ToolCall.DONE, **fields},
    )
    ToolCall.objects.filter(pk=call.pk).update(created_at=timezone.now() - timedelta(minutes=minutes_ago))
    call.refresh_from_db()
    return call


@pytest.fixture
def threads():
    return {
        "a": save("thread-a", "alice", "sess-a", agent="smart"),
        "b": save("thread-b", "bob", "sess-b", agent="smart"),
    }


@pytest.fixture
def calls(threads):
    now = timezone.now()
    a, b = threads["a"], threads["b"]
    return {
        # read-only tool, no approval, ran
        "search": make_call(a, "toolu_1", "mcp__omni__search_conversations", 50,
                            tool_input={"query": "bread"}, result="thread-x: How to bake bread",
                            duration_ms=12),
        # approved, ran
        "delete_allowed": make_call(
            a, "toolu_2", "mcp__omni__delete_conversation", 40, tool_input={"threadId": "thread-x"},
            needs_approval=True, approval_id="appr-allow-1", decision="allow", decided_by="alice",
            decided_at=now - timedelta(minutes=39), result="deleted thread-x", duration_ms=85),
        # denied, never ran
        "delete_denied": make_call(
            b, "toolu_3", "mcp__omni__delete_conversation", 30, tool_input={"threadId": "thread-y"},
            needs_approval=True, approval_id="appr-deny-2", decision="deny", decided_by="bob",
            decided_at=now - timedelta(minutes=29), status=ToolCall.REFUSED,
            decision_message="not that one"),
        # still waiting for a person
        "pending": make_call(
            b, "toolu_4", "mcp__omni__delete_conversation", 20, tool_input={"threadId": "thread-z"},
            needs_approval=True, approval_id="appr-wait-3", status=ToolCall.PENDING,
            expires_at=now + timedelta(minutes=5)),
        # expired, never ran
        "expired": make_call(
            a, "toolu_5", "mcp__omni__delete_conversation", 10, tool_input={"threadId": "thread-w"},
            needs_approval=True, approval_id="appr-exp-4", decision="expired", decided_by="timeout",
            decided_at=now - timedelta(minutes=9), status=ToolCall.REFUSED),
        # a tool of the project's own that failed
        "failed": make_call(b, "toolu_6", "mcp__omni__read_conversation", 5,
                            tool_input={"threadId": "thread-q"}, status=ToolCall.ERROR, is_error=True,
                            result="no such thread", duration_ms=3),
    }


def changelist(client, **query):
    response = client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200, response.status_code
    return response


def listed(response) -> list[str]:
    return [c.tool_use_id for c in response.context["cl"].result_list]


def change_url(obj) -> str:
    return reverse(f"admin:sessions_app_{obj._meta.model_name}_change", args=[obj.pk])


def thread_page(client, mapping) -> str:
    response = client.get(change_url(mapping))
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def field(page: str, name: str) -> str:
    """The rendered row of a read-only field: from its ``field-<name>`` row to
    the next row (or the end of the fieldset)."""
    start = re.search(rf'field-{name}["\s]', page).start()
    ends = [i for i in (page.find('class="form-row', start), page.find("</fieldset>", start)) if i > 0]
    return page[start:min(ends)]


# --- the list ---------------------------------------------------------------------------


def test_the_list_newest_first_with_its_columns(admin_client, calls, threads):
    response = changelist(admin_client)
    assert listed(response) == ["toolu_6", "toolu_5", "toolu_4", "toolu_3", "toolu_2", "toolu_1"]
    page = response.content.decode()
    headers = re.findall(r'<th scope="col"[^>]*class="[^"]*column-(\w+)', page)
    assert headers == [
        "created_at", "resource_id", "thread", "tool", "status", "decision", "decided_by", "duration",
    ]
    # the thread column leads to the thread's own admin page
    assert f'<a href="{change_url(threads["a"])}">thread-a</a>' in page
    assert f'<a href="{change_url(threads["b"])}">thread-b</a>' in page
    # and each row to the call's page
    assert change_url(calls["search"]) in page
    for text in ("mcp__omni__delete_conversation", "alice", "bob", "timeout", "85 ms", "refused"):
        assert text in page


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"tool": "mcp__omni__read_conversation"}, ["toolu_6"]),
        ({"tool": "mcp__omni__delete_conversation"}, ["toolu_5", "toolu_4", "toolu_3", "toolu_2"]),
        ({"status__exact": "pending"}, ["toolu_4"]),
        ({"status__exact": "refused"}, ["toolu_5", "toolu_3"]),
        ({"status__exact": "error"}, ["toolu_6"]),
        ({"decision__exact": "allow"}, ["toolu_2"]),
        ({"decision__exact": "deny"}, ["toolu_3"]),
        ({"decision__exact": "expired"}, ["toolu_5"]),
        ({"decision__isnull": "True"}, ["toolu_6", "toolu_4", "toolu_1"]),
        ({"needs_approval__exact": "0"}, ["toolu_6", "toolu_1"]),
        ({"needs_approval__exact": "1", "status__exact": "refused"}, ["toolu_5", "toolu_3"]),
    ],
)
def test_filters(admin_client, calls, query, expected):
    assert listed(changelist(admin_client, **query)) == expected


def test_the_filters_offered(admin_client, calls):
    page = changelist(admin_client).content.decode().lower()
    for title in ("by tool", "by status", "by decision", "by needs approval"):
        assert title in page, title
    # resources are too many for a filter: they are searched
    assert "by resource" not in page and "by thread" not in page


@pytest.mark.parametrize(
    "q, expected",
    [
        ("thread-a", ["toolu_5", "toolu_2", "toolu_1"]),  # thread
        ("bob", ["toolu_6", "toolu_4", "toolu_3"]),  # resource
        ("search_conversations", ["toolu_1"]),  # tool
        ("appr-wait-3", ["toolu_4"]),  # approval id
        ("turn-toolu_2", ["toolu_2"]),  # turn id
        ("nothing-matches", []),
    ],
)
def test_search(admin_client, calls, q, expected):
    assert listed(changelist(admin_client, q=q)) == expected


def test_the_calls_of_one_thread(admin_client, calls, threads):
    """The thread page's link to its whole list of calls."""
    url = sessions_admin._calls_list_url(threads["a"].pk)
    response = admin_client.get(url)
    assert response.status_code == 200
    assert listed(response) == ["toolu_5", "toolu_2", "toolu_1"]


# --- nothing editable -------------------------------------------------------------------


def test_nothing_can_be_added(admin_client, calls):
    assert admin_client.get(reverse("admin:sessions_app_toolcall_add")).status_code == 403
    assert reverse("admin:sessions_app_toolcall_add") not in changelist(admin_client).content.decode()


def test_a_call_cannot_be_changed(admin_client, calls):
    call = calls["delete_denied"]
    response = admin_client.get(change_url(call))
    assert response.status_code == 200
    page = response.content.decode()
    assert not re.search(r"<(input|textarea|select)[^>]*name=\"(?!csrfmiddlewaretoken)", page)
    assert 'name="_save"' not in page and 'name="_continue"' not in page
    assert not response.context["adminform"].form.fields
    before = ToolCall.objects.values().get(pk=call.pk)
    response = admin_client.post(change_url(call), {
        "decision": "allow", "decided_by": "mallory", "status": "decided", "result": "rewritten",
    })
    assert response.status_code == 403
    assert ToolCall.objects.values().get(pk=call.pk) == before


def test_a_call_cannot_be_deleted_on_its_own(admin_client, calls):
    call = calls["search"]
    url = reverse("admin:sessions_app_toolcall_delete", args=[call.pk])
    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert url not in admin_client.get(change_url(call)).content.decode()
    # no bulk delete either: the list offers no actions
    response = changelist(admin_client)
    assert "delete_selected" not in response.content.decode()
    admin_client.post(reverse(CHANGELIST), {
        "action": "delete_selected", "_selected_action": [c.pk for c in calls.values()], "post": "yes",
    })
    assert ToolCall.objects.count() == len(calls)


def test_staff_need_the_view_permission(client, calls, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse(CHANGELIST)).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_toolcall"))
    assert listed(changelist(client))[0] == "toolu_6"
    assert client.get(change_url(calls["search"])).status_code == 200


def test_the_admin_needs_staff(client, calls, django_user_model):
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 302 and "/login/" in response["Location"]
    client.force_login(django_user_model.objects.create_user("plain", password="pw-plain-123"))
    response = client.get(change_url(calls["search"]))
    assert response.status_code == 302 and "/login/" in response["Location"]


# --- a call's page ----------------------------------------------------------------------


def test_a_calls_page_shows_everything_read_only(admin_client, calls, threads):
    call = calls["delete_allowed"]
    page = admin_client.get(change_url(call)).content.decode()
    assert f'<a href="{change_url(threads["a"])}">thread-a</a>' in field(page, "thread")
    pretty = html.escape(json.dumps({"threadId": "thread-x"}, indent=2))
    assert f"<pre" in field(page, "pretty_input") and pretty in field(page, "pretty_input")
    assert "deleted thread-x" in field(page, "result_preview")
    for name, value in [
        ("resource_id", "alice"), ("session_id", "sess-a"), ("turn_id", "turn-toolu_2"),
        ("tool_use_id", "toolu_2"), ("tool", "mcp__omni__delete_conversation"),
        ("approval_id", "appr-allow-1"), ("decision", "allow"), ("decided_by", "alice"),
        ("duration", "85 ms"), ("status", "done"),
    ]:
        assert value in field(page, name), name


def test_input_that_is_not_json_is_shown_as_stored(admin_client, threads):
    call = make_call(threads["a"], "toolu_raw", "mcp__ext__thing", 1)
    ToolCall.objects.filter(pk=call.pk).update(input="not json {")
    page = admin_client.get(change_url(call)).content.decode()
    assert "not json {" in field(page, "pretty_input")
    assert "—" in field(page, "result_preview")


def test_tool_input_and_result_are_escaped_everywhere(admin_client, threads):
    call = make_call(
        threads["a"], "toolu_x", "mcp__ext__<b>tool</b>", 1, tool_input=XSS_INPUT, result=XSS_RESULT,
        needs_approval=True, approval_id="appr-x", decision="deny", decided_by="<i>who</i>",
        decided_at=timezone.now(), decision_message="<script>alert('why')</script>",
        status=ToolCall.REFUSED,
    )
    pages = {
        "list": changelist(admin_client).content.decode(),
        "call": admin_client.get(change_url(call)).content.decode(),
        "thread": thread_page(admin_client, threads["a"]),
    }
    for name, page in pages.items():
        for raw in ("<script>alert", "<img src=x", "<b>bold</b>", "<b>tool</b>", "<i>who</i>"):
            assert raw not in page, (name, raw)
        assert "mcp__ext__&lt;b&gt;tool&lt;/b&gt;" in page, name
        assert "&lt;i&gt;who&lt;/i&gt;" in page, name
    call_page = pages["call"]
    pretty = json.dumps(XSS_INPUT, indent=2, ensure_ascii=False)
    assert html.escape(pretty) in field(call_page, "pretty_input")
    assert html.escape(XSS_RESULT) in field(call_page, "result_preview")
    assert "&lt;script&gt;alert(&#x27;why&#x27;)&lt;/script&gt;" in field(call_page, "decision_message")
    calls_on_thread = field(pages["thread"], "tool_calls")
    assert html.escape(XSS_RESULT) in calls_on_thread
    assert html.escape(json.dumps(XSS_INPUT, ensure_ascii=False)) in calls_on_thread


# --- the thread's page ------------------------------------------------------------------


def rows_on(page: str) -> list[list[str]]:
    section = field(page, "tool_calls")
    rows = re.findall(r"<tr data-tool-call=\"\d+\">(.*?)</tr>", section, re.DOTALL)
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
            for row in rows]


def test_the_thread_page_shows_its_calls_newest_last(admin_client, calls, threads):
    page = thread_page(admin_client, threads["a"])
    rows = rows_on(page)
    assert [r[1] for r in rows] == [
        "mcp__omni__search_conversations", "mcp__omni__delete_conversation",
        "mcp__omni__delete_conversation",
    ]
    search, allowed, expired = rows
    # created, tool, input, status, decision, decided by, decided at, duration, result
    assert search[2:6] == ['{"query": "bread"}', "done", "—", "—"]
    assert search[7:] == ["12 ms", "thread-x: How to bake bread"]
    assert allowed[3:6] == ["done", "allow", "alice"]
    assert allowed[6] != "—" and allowed[8] == "deleted thread-x"
    assert expired[3:6] == ["refused", "expired", "timeout"]
    # each call links to its own page; the other thread's calls are not here
    section = field(page, "tool_calls")
    for name in ("search", "delete_allowed", "expired"):
        assert change_url(calls[name]) in section
    for name in ("delete_denied", "pending", "failed"):
        assert change_url(calls[name]) not in section
    assert 'name="tool_calls"' not in page


def test_the_other_thread_shows_a_pending_call(admin_client, calls, threads):
    rows = rows_on(thread_page(admin_client, threads["b"]))
    assert [(r[3], r[4], r[5]) for r in rows] == [
        ("refused", "deny", "bob"), ("pending", "—", "—"), ("error", "—", "—"),
    ]


def test_a_thread_without_calls(admin_client, threads):
    section = field(thread_page(admin_client, threads["a"]), "tool_calls")
    assert "No tool calls." in section and "<table" not in section


def test_a_long_history_shows_the_latest_and_links_the_rest(admin_client, threads, monkeypatch):
    monkeypatch.setattr(sessions_admin, "THREAD_CALLS_SHOWN", 3)
    for i in range(5):
        make_call(threads["a"], f"toolu_{i}", f"tool_{i}", 10 - i)
    page = thread_page(admin_client, threads["a"])
    assert [r[1] for r in rows_on(page)] == ["tool_2", "tool_3", "tool_4"]
    section = field(page, "tool_calls")
    assert html.escape(sessions_admin._calls_list_url(threads["a"].pk)) in section


def test_a_long_input_or_result_is_cut_on_the_thread_page(admin_client, threads):
    make_call(threads["a"], "toolu_long", "t", 1, tool_input={"q": "x" * 1000}, result="y" * 1000)
    row = rows_on(thread_page(admin_client, threads["a"]))[0]
    assert len(row[2]) == sessions_admin.PREVIEW_CHARS and row[2].endswith("…")
    assert len(row[8]) == sessions_admin.PREVIEW_CHARS


# --- deleted with the thread ------------------------------------------------------------


def test_deleting_the_thread_deletes_its_calls(admin_client, calls, threads):
    mapping = threads["a"]
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[mapping.pk])
    confirm = admin_client.get(url)
    assert confirm.status_code == 200
    page = confirm.content.decode()
    assert "permission" not in page.lower()  # the audit does not block its thread's deletion
    assert "Tool call" in page  # and the confirmation says it goes too
    with mock.patch.object(services, "delete_session", wraps=services.delete_session) as spy:
        response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    spy.assert_called_once_with("thread-a", "alice")
    assert not SessionMapping.objects.filter(pk=mapping.pk).exists()
    assert not ToolCall.objects.filter(thread_id="thread-a").exists()
    assert sorted(ToolCall.objects.values_list("tool_use_id", flat=True)) == ["toolu_3", "toolu_4", "toolu_6"]


def test_bulk_deleting_threads_deletes_their_calls(admin_client, calls, threads):
    data = {"action": "delete_selected", "_selected_action": [m.pk for m in threads.values()]}
    changelist_url = reverse("admin:sessions_app_sessionmapping_changelist")
    confirm = admin_client.post(changelist_url, data)
    assert confirm.status_code == 200 and "permission" not in confirm.content.decode().lower()
    response = admin_client.post(changelist_url, {**data, "post": "yes"})
    assert response.status_code == 302
    assert not SessionMapping.objects.exists() and not ToolCall.objects.exists()


def test_staff_who_may_delete_threads_delete_their_calls(client, calls, threads, django_user_model):
    """Nobody may delete a call on its own, yet a thread's deletion is not
    refused for lack of that permission."""
    staff = django_user_model.objects.create_user("ops", password="pw-ops-123", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(
        codename__in=["view_sessionmapping", "delete_sessionmapping"]))
    client.force_login(staff)
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[threads["b"].pk])
    confirm = client.get(url)
    assert confirm.status_code == 200 and "permission" not in confirm.content.decode().lower()
    assert client.post(url, {"post": "yes"}).status_code == 302
    assert not ToolCall.objects.filter(thread_id="thread-b").exists()
    assert ToolCall.objects.filter(thread_id="thread-a").count() == 3


def test_staff_without_the_thread_delete_permission_cannot(client, calls, threads, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="pw-view-123", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(
        codename__in=["view_sessionmapping", "view_toolcall"]))
    client.force_login(staff)
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[threads["b"].pk])
    assert client.post(url, {"post": "yes"}).status_code == 403
    assert ToolCall.objects.filter(thread_id="thread-b").count() == 3


# --- a libSQL server (no date functions) ------------------------------------------------

REMOTE_SCRIPT = """
from django.db import connection
from django.test import Client
from django.test.utils import setup_test_environment
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from sessions_app.models import SessionMapping, ToolCall

setup_test_environment()
assert connection.vendor == "sqlite" and connection.is_remote, connection.settings_dict
mapping = SessionMapping.objects.create(thread_id="t1", resource_id="r1", session_id="s1")
for i, (status, decision) in enumerate([("done", None), ("refused", "deny"), ("pending", None)]):
    ToolCall.objects.create(
        mapping=mapping, resource_id="r1", thread_id="t1", turn_id=f"turn-{i}", session_id="s1",
        tool_use_id=f"toolu_{i}", tool=f"tool_{i % 2}", input='{"q": 1}', status=status,
        decision=decision, decided_by="r1" if decision else "", needs_approval=bool(i),
        decided_at=timezone.now() if decision else None, duration_ms=5)
client = Client()
client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123"))
changelist = reverse("admin:sessions_app_toolcall_changelist")
for query in [{}, {"tool": "tool_0"}, {"status__exact": "refused"}, {"decision__exact": "deny"},
              {"decision__isnull": "True"}, {"needs_approval__exact": "1"}, {"q": "turn-1"},
              {"o": "-8"}, {"mapping__id__exact": mapping.pk}]:
    response = client.get(changelist, query)
    assert response.status_code == 200, (query, response.status_code)
    assert response.context["cl"].result_count >= 1, query
for call in ToolCall.objects.all():
    assert client.get(reverse("admin:sessions_app_toolcall_change", args=[call.pk])).status_code == 200
page = client.get(reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk]))
assert page.status_code == 200 and page.content.decode().count("data-tool-call=") == 3
delete = reverse("admin:sessions_app_sessionmapping_delete", args=[mapping.pk])
assert client.get(delete).status_code == 200
assert client.post(delete, {"post": "yes"}).status_code == 302
assert not ToolCall.objects.exists()
print("REMOTE ADMIN OK")
"""


@pytest.mark.engine_agnostic  # on a libSQL server of its own, whatever the run's engine
def test_the_audit_admin_on_a_libsql_server(tmp_path):
    """The list (every filter, search, sorting), a call's page, the thread's
    page and the thread's deletion need no SQL date function, which a remote
    libSQL connection lacks (README, "The libSQL engine")."""
    from tests.test_engine_remote import on_a_libsql_server

    proc = on_a_libsql_server(tmp_path, REMOTE_SCRIPT)
    assert "REMOTE ADMIN OK" in proc.stdout


# --- what the thread page shows depends on the viewer's permissions -------------------------


@pytest.mark.parametrize("extra, shown", [
    ([], set()),
    (["view_toolcall"], {"tool_calls"}),
    (["view_turnrecord"], {"turn_records"}),
    (["view_toolcall", "view_turnrecord"], {"tool_calls", "turn_records"}),
])
def test_the_thread_page_shows_calls_and_turns_only_to_who_may_view_them(
        client, calls, threads, django_user_model, extra, shown):
    from sessions_app.models import TurnRecord

    TurnRecord.objects.create(turn_id="turn-secret", resource_id="alice", thread_id="thread-a",
                              started_at=timezone.now(), day=timezone.now().date(), outcome="done",
                              cost_usd="0.123456")
    staff = django_user_model.objects.create_user("reader", password="pw-read-123", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_sessionmapping", *extra]))
    client.force_login(staff)
    page = thread_page(client, threads["a"])
    assert "field-conversation" in page and "sess-a" in page  # the thread itself, as before
    assert ("field-tool_calls" in page) == ("tool_calls" in shown)
    assert ("mcp__omni__search_conversations" in page) == ("tool_calls" in shown)
    assert ("How to bake bread" in page) == ("tool_calls" in shown)  # a call's result
    assert ("field-turn_records" in page) == ("turn_records" in shown)
    assert ("turn-secret" in page) == ("turn_records" in shown)
    assert ("$0.123456" in page) == ("turn_records" in shown)
