"""The admin's usage pages (contract §10): per-resource budget overrides that
the budget check then applies, the spend per resource and UTC day (sums,
sorting, the resource search, the day range and its validation, the chart
drawn by the server as inline SVG with escaped labels), each turn's record
read-only, the thread's cost and turns on its page, and none of it needing
an SQL date function (a remote libSQL database has none)."""

import html
import re
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from sessions_app import admin as sessions_admin
from sessions_app import services, usage
from sessions_app.models import ResourceBudget, SessionMapping, TurnRecord

pytestmark = pytest.mark.django_db

SPEND = "admin:sessions_app_turnrecord_spend"
BUDGETS = "admin:sessions_app_resourcebudget_changelist"
RECORDS = "admin:sessions_app_turnrecord_changelist"
XSS = "<script>alert('r')</script>"
# What Django's date functions turn into on SQLite, PostgreSQL and MySQL.
DATE_FUNCTIONS = re.compile(
    # (PostgreSQL's own date parameters show as '2026-12-03'::date: a literal, not a function.)
    r"django_date|django_datetime|strftime|date_trunc|extract\s*\(|\)::date|at time zone|julianday",
    re.IGNORECASE,
)


@pytest.fixture(autouse=True)
def no_default_budget(settings):
    settings.OMNI_DAILY_BUDGET_USD = 0


_turns = iter(range(1, 10**9))


def record(resource, day, cost, *, input_tokens=10, output_tokens=5, thread="thread-1",
           outcome="done", agent="smart", hour=12) -> TurnRecord:
    n = next(_turns)
    started = datetime.combine(day, time(hour), tzinfo=UTC) + timedelta(seconds=n % 3600)
    return TurnRecord.objects.create(
        turn_id=f"turn-{n}", resource_id=resource, thread_id=thread, agent=agent,
        model="claude-test", started_at=started, day=day, duration_ms=1200, first_text_ms=300,
        outcome=outcome, worker="w1", input_tokens=input_tokens, output_tokens=output_tokens,
        cost_usd=Decimal(str(cost)))


def days_ago(n):
    return usage.today() - timedelta(days=n)


# --- budgets -------------------------------------------------------------------------------


def add_budget(client, resource_id, daily_usd, note=""):
    return client.post(reverse("admin:sessions_app_resourcebudget_add"),
                       {"resource_id": resource_id, "daily_usd": daily_usd, "note": note})


def change_budget(client, budget, daily_usd, note=""):
    return client.post(reverse("admin:sessions_app_resourcebudget_change", args=[budget.pk]),
                       {"resource_id": budget.resource_id, "daily_usd": daily_usd, "note": note})


def test_an_override_made_in_the_admin_is_the_budget_a_turn_start_checks(admin_client, settings):
    # A worker has just looked: no override anywhere (cached for a few seconds).
    assert usage.budget_for_sync("alice") is None
    assert usage.check_budget_sync("alice") is None

    response = add_budget(admin_client, "alice", "0.50", "trial account")
    assert response.status_code == 302, response.content
    budget = ResourceBudget.objects.get(resource_id="alice")
    assert budget.note == "trial account"
    # The admin cleared this process's cache: the new override counts at once.
    assert usage.budget_for_sync("alice") == Decimal("0.5")
    assert usage.budget_for_sync("bob") is None  # others keep the default (none)
    assert usage.check_budget_sync("alice") == Decimal("0.5")

    record("alice", usage.today(), "0.30")
    record("alice", usage.today(), "0.25")
    record("alice", days_ago(1), "9")  # yesterday's spend does not count today
    with pytest.raises(usage.BudgetExceeded) as refused:
        usage.check_budget_sync("alice")
    assert refused.value.code == "budget_exceeded" and refused.value.retry_after >= 1

    # Raised: allowed again, with what is left.
    assert change_budget(admin_client, budget, "1.00").status_code == 302
    assert usage.budget_for_sync("alice") == Decimal("1")
    assert usage.check_budget_sync("alice") == Decimal("0.45")

    # Emptied: no cap for alice, whatever the default.
    settings.OMNI_DAILY_BUDGET_USD = 0.1
    assert change_budget(admin_client, budget, "").status_code == 302
    assert ResourceBudget.objects.get(pk=budget.pk).daily_usd is None
    assert usage.budget_for_sync("alice") is None
    assert usage.check_budget_sync("alice") is None
    assert usage.budget_for_sync("bob") == Decimal("0.1")

    # Deleted: the default applies again.
    delete = reverse("admin:sessions_app_resourcebudget_delete", args=[budget.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not ResourceBudget.objects.exists()
    with pytest.raises(usage.BudgetExceeded):
        usage.check_budget_sync("alice")


def test_a_bulk_delete_clears_the_cache_too(admin_client):
    add_budget(admin_client, "alice", "0.10")
    add_budget(admin_client, "bob", "0.20")
    record("alice", usage.today(), "0.5")
    with pytest.raises(usage.BudgetExceeded):
        usage.check_budget_sync("alice")
    response = admin_client.post(reverse(BUDGETS), {
        "action": "delete_selected", "post": "yes",
        "_selected_action": list(ResourceBudget.objects.values_list("pk", flat=True)),
    })
    assert response.status_code == 302
    assert not ResourceBudget.objects.exists()
    assert usage.check_budget_sync("alice") is None


@pytest.mark.parametrize("amount, message", [
    ("-1", "cannot be negative"),
    ("0", "0 would mean no cap"),
    ("abc", "Enter a number"),
])
def test_a_bad_amount_is_refused_with_a_message(admin_client, amount, message):
    response = add_budget(admin_client, "alice", amount)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ResourceBudget.objects.exists()
    assert usage.budget_for_sync("alice") is None


def test_a_resource_has_one_override(admin_client):
    assert add_budget(admin_client, "alice", "1").status_code == 302
    response = add_budget(admin_client, "alice", "2")
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert ResourceBudget.objects.get().daily_usd == Decimal("1")


def test_the_budget_list_shows_spent_today_and_who_is_over(admin_client, settings):
    settings.OMNI_DAILY_BUDGET_USD = 5
    add_budget(admin_client, "alice", "0.50", "trial")
    add_budget(admin_client, "bob", "2")
    add_budget(admin_client, "carol", "", "internal: no cap")
    record("alice", usage.today(), "0.75")
    record("bob", usage.today(), "0.5")
    record("bob", days_ago(1), "10")
    record("dave", usage.today(), "3")  # no override: not listed

    response = admin_client.get(reverse(BUDGETS))
    assert response.status_code == 200
    page = response.content.decode()
    headers = re.findall(r'<th scope="col"[^>]*class="[^"]*column-(\w+)', page)
    assert headers == ["resource_id", "budget", "spent", "status", "note", "updated_at"]
    rows = {r.resource_id: r for r in response.context["cl"].result_list}
    assert set(rows) == {"alice", "bob", "carol"}
    assert rows["alice"].spent_today == Decimal("0.75")
    assert rows["bob"].spent_today == Decimal("0.5")
    assert rows["carol"].spent_today == 0
    for text in ("$0.50", "$0.750000", "over budget", "$2.00", "$1.500000 left", "no cap",
                 "internal: no cap", "$5.00 per UTC day (OMNI_DAILY_BUDGET_USD)",
                 "Spend per resource and day"):
        assert text in page, text
    # Sorted by what was spent today, most first.
    response = admin_client.get(reverse(BUDGETS), {"o": "-3"})
    assert [r.resource_id for r in response.context["cl"].result_list][:2] == ["alice", "bob"]
    # The change page says what was spent today.
    alice = ResourceBudget.objects.get(resource_id="alice")
    change = admin_client.get(reverse("admin:sessions_app_resourcebudget_change", args=[alice.pk]))
    assert change.status_code == 200 and "$0.750000" in change.content.decode()
    assert admin_client.get(reverse("admin:sessions_app_resourcebudget_add")).status_code == 200


def test_the_budget_list_escapes_resource_and_note(admin_client):
    add_budget(admin_client, XSS, "1", note='<img src=x onerror="alert(1)">')
    page = admin_client.get(reverse(BUDGETS)).content.decode()
    assert XSS not in page and "<img src=x" not in page
    assert html.escape(XSS) in page or "&lt;script&gt;" in page


def test_staff_need_the_budget_permissions(client, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse(BUDGETS)).status_code == 403
    assert add_budget(client, "alice", "1").status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_resourcebudget"))
    assert client.get(reverse(BUDGETS)).status_code == 200
    assert add_budget(client, "alice", "1").status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="add_resourcebudget"))
    assert add_budget(client, "alice", "1").status_code == 302
    assert usage.budget_for_sync("alice") == Decimal("1")


# --- spend per resource and day ----------------------------------------------------------------


@pytest.fixture
def spend():
    """alice: two turns today, one 3 days ago; bob: one today (many tokens),
    one 40 days ago (outside the default range); carol: one 10 days ago."""
    return [
        record("alice", usage.today(), "0.10", input_tokens=100, output_tokens=10),
        record("alice", usage.today(), "0.05", input_tokens=50, output_tokens=20),
        record("alice", days_ago(3), "0.20", input_tokens=30, output_tokens=3),
        record("bob", usage.today(), "0.01", input_tokens=5000, output_tokens=1),
        record("bob", days_ago(40), "7", input_tokens=1, output_tokens=1),
        record("carol", days_ago(10), "1.5", input_tokens=10, output_tokens=400),
    ]


def get_spend(client, **query):
    response = client.get(reverse(SPEND), query)
    assert response.status_code == 200, response.content[:500]
    return response


def shown(response) -> list[tuple]:
    return [(r["day"], r["resource_id"], r["turns"], r["input"], r["output"], r["cost"])
            for r in response.context["rows"]]


def day(n) -> str:
    return days_ago(n).isoformat()


def test_the_spend_page_sums_per_resource_and_day(admin_client, spend):
    response = get_spend(admin_client)
    assert shown(response) == [  # default: newest day first, then resource
        (day(0), "alice", 2, 150, 30, "$0.150000"),
        (day(0), "bob", 1, 5000, 1, "$0.010000"),
        (day(3), "alice", 1, 30, 3, "$0.200000"),
        (day(10), "carol", 1, 10, 400, "$1.500000"),
    ]
    assert response.context["total"] == {"turns": 5, "input": 5190, "output": 434, "cost": "$1.860000"}
    assert (response.context["from"], response.context["to"]) == (day(usage.DEFAULT_DAYS - 1), day(0))
    page = response.content.decode()
    assert "$1.860000" in page and "Spend per resource and day" in page
    # Each row links to its records (plain field lookups).
    assert response.context["rows"][0]["records_url"].endswith(f"?resource_id=alice&day={day(0)}")
    records = admin_client.get(response.context["rows"][0]["records_url"])
    assert records.status_code == 200 and records.context["cl"].result_count == 2


@pytest.mark.parametrize("order, expected", [
    ("day", ["carol", "alice", "alice", "bob"]),
    ("-day", ["alice", "bob", "alice", "carol"]),
    ("resource", ["alice", "alice", "bob", "carol"]),
    ("-resource", ["carol", "bob", "alice", "alice"]),
    ("turns", ["bob", "alice", "carol", "alice"]),  # ties: newest day first, then resource
    ("-turns", ["alice", "bob", "alice", "carol"]),
    ("input", ["carol", "alice", "alice", "bob"]),
    ("-input", ["bob", "alice", "alice", "carol"]),
    ("output", ["bob", "alice", "alice", "carol"]),
    ("-output", ["carol", "alice", "alice", "bob"]),
    ("cost", ["bob", "alice", "alice", "carol"]),
    ("-cost", ["carol", "alice", "alice", "bob"]),
    ("nonsense", ["alice", "bob", "alice", "carol"]),  # the default
])
def test_the_spend_page_sorts_by_each_column(admin_client, spend, order, expected):
    response = get_spend(admin_client, o=order)
    assert [row[1] for row in shown(response)] == expected
    if order == "-cost":
        assert [row[5] for row in shown(response)] == ["$1.500000", "$0.200000", "$0.150000", "$0.010000"]


def test_the_column_links_sort_and_flip(admin_client, spend):
    response = get_spend(admin_client, q="a", o="cost")
    columns = {c["key"]: c for c in response.context["columns"]}
    assert columns["cost"]["sorted"] and not columns["cost"]["descending"]
    assert "o=-cost" in columns["cost"]["url"]  # a second click flips it
    assert "o=-turns" in columns["turns"]["url"]  # another column: descending first
    for c in columns.values():
        assert "q=a" in c["url"] and f"from={day(29)}" in c["url"] and f"to={day(0)}" in c["url"]
    page = response.content.decode()
    for key in ("day", "resource", "turns", "input", "output", "cost"):
        assert f'class="column-{key}' in page
    flipped = get_spend(admin_client, **dict(p.split("=") for p in columns["cost"]["url"][1:].split("&")))
    assert [row[5] for row in shown(flipped)][0] == "$1.500000"


def test_the_resource_search_and_the_day_range(admin_client, spend):
    assert [r[1] for r in shown(get_spend(admin_client, q="ALI"))] == ["alice", "alice"]
    assert shown(get_spend(admin_client, q="nobody")) == []
    response = get_spend(admin_client, **{"from": day(45), "to": day(5)})
    assert [(r[0], r[1]) for r in shown(response)] == [(day(10), "carol"), (day(40), "bob")]
    assert response.context["total"]["cost"] == "$8.500000"
    only = get_spend(admin_client, **{"from": day(3), "to": day(3), "q": "alice"})
    assert shown(only) == [(day(3), "alice", 1, 30, 3, "$0.200000")]
    # A range of exactly the maximum is accepted.
    response = get_spend(admin_client, **{"from": day(usage.MAX_RANGE_DAYS - 1), "to": day(0)})
    assert len(shown(response)) == 5
    assert not list(response.context["messages"])


@pytest.mark.parametrize("query, message", [
    ({"from": "yesterday"}, "from and to are dates: YYYY-MM-DD"),
    ({"to": "2026-13-45"}, "from and to are dates: YYYY-MM-DD"),
    ({"from": "2026-03-02", "to": "2026-03-01"}, "from is after to"),
    ({"from": "2024-01-01", "to": "2025-12-31"}, "a range covers at most 366 days"),
    ({"from": "<script>x</script>"}, "from and to are dates"),
])
def test_a_bad_range_is_a_message_not_an_error(admin_client, spend, query, message):
    response = get_spend(admin_client, **query)
    page = response.content.decode()
    assert message.lower() in page.lower()  # the admin capitalizes a message
    assert "showing the last 30 days instead" in page
    assert (response.context["from"], response.context["to"]) == (day(29), day(0))
    assert len(shown(response)) == 4
    assert "<script>x" not in page


def test_the_chart_is_inline_svg_with_escaped_labels(admin_client):
    record(XSS, usage.today(), "0.40")
    record(XSS, days_ago(2), "0.10")
    record("alice & bob", days_ago(2), "0.30")
    response = get_spend(admin_client, q="")
    page = response.content.decode()
    assert page.count('<svg class="omni-spend-chart"') == 1
    svg = re.search(r'<svg class="omni-spend-chart".*?</svg>', page, re.S)
    assert svg, "no chart"
    svg = svg.group(0)
    # Drawn here: no script, nothing fetched.
    assert "<script" not in svg.replace(html.escape("<script"), "")
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # The page loads only the admin's own scripts, from this server.
    sources = re.findall(r"<script\b([^>]*)>", page)
    assert sources and all(re.fullmatch(r' src="/static/admin/js/[\w.]+\.js"( defer)?', s) for s in sources)
    assert "cdn" not in page.lower()
    # Two days with spend: two bars, stacked per resource; labels escaped.
    assert svg.count('class="omni-spend-bar"') == 2
    assert "&lt;script&gt;alert(&#x27;r&#x27;)&lt;/script&gt;" in svg
    assert "alice &amp; bob" in svg
    assert f"{day(2)}: $0.400000" in svg and f"{day(0)}: $0.400000" in svg
    assert f"{day(2)} alice &amp; bob: $0.300000" in svg
    heights = sorted(float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)" fill="#\w+"><title>', svg))
    assert heights == pytest.approx([40.0, 120.0, 160.0])  # 0.10, 0.30 and the peak 0.40
    # The search text appears in the chart's title, escaped too.
    searched = get_spend(admin_client, q="<script>").content.decode()
    assert "containing “&lt;script&gt;”" in searched


def test_the_chart_stacks_the_top_spenders_and_the_others(admin_client, monkeypatch):
    monkeypatch.setattr(sessions_admin, "CHART_RESOURCES", 2)
    for name, cost in [("r1", "4"), ("r2", "3"), ("r3", "2"), ("r4", "1")]:
        record(name, usage.today(), cost)
    chart = get_spend(admin_client).context["chart"]
    assert [e["name"] for e in chart["legend"]] == ["r1", "r2", "others"]
    (bar,) = chart["bars"]
    assert [s["title"] for s in bar["segments"]] == [
        f"{day(0)} r1: $4.000000", f"{day(0)} r2: $3.000000", f"{day(0)} others: $3.000000"]
    assert chart["peak"] == "$10.0000"


def test_no_spend_no_chart(admin_client):
    page = get_spend(admin_client).content.decode()
    assert '<svg class="omni-spend-chart"' not in page and "Nothing was spent in this selection." in page
    assert "No turns recorded in this selection." in page


def test_todays_rows_over_budget_are_marked(admin_client, settings):
    settings.OMNI_DAILY_BUDGET_USD = 1
    add_budget(admin_client, "bob", "")  # no cap
    record("alice", usage.today(), "1.5")
    record("bob", usage.today(), "2")
    record("carol", usage.today(), "0.5")
    record("alice", days_ago(1), "3")  # an earlier day: not marked
    rows = {(r["day"], r["resource_id"]): r["over_budget"] for r in get_spend(admin_client).context["rows"]}
    assert rows == {(day(0), "alice"): True, (day(0), "bob"): False, (day(0), "carol"): False,
                    (day(1), "alice"): False}


def test_the_spend_page_pages(admin_client, monkeypatch):
    monkeypatch.setattr(sessions_admin, "SPEND_PER_PAGE", 2)
    for n in range(5):
        record("alice", days_ago(n), "0.01")
    first = get_spend(admin_client, o="day")
    assert [r[0] for r in shown(first)] == [day(4), day(3)]
    assert first.context["total"]["turns"] == 5  # the whole selection
    second = get_spend(admin_client, o="day", p="2")
    assert [r[0] for r in shown(second)] == [day(2), day(1)]
    assert "p=3" in second.content.decode()
    assert [r[0] for r in shown(get_spend(admin_client, o="day", p="99"))] == [day(0)]


def test_the_spend_page_needs_the_records_view_permission(client, spend, django_user_model):
    assert client.get(reverse(SPEND)).status_code == 302  # to the login
    staff = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse(SPEND)).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_turnrecord"))
    assert len(shown(get_spend(client))) == 4


def test_the_usage_pages_use_no_sql_date_function(admin_client, spend):
    """Only the stored ``day`` (equality, ranges) and Sum/Count."""
    mapping = async_to_sync(services.save_session)("thread-1", "alice", "sess-1", agent="smart")
    ResourceBudget.objects.create(resource_id="alice", daily_usd=Decimal("1"))
    with CaptureQueriesContext(connection) as queries:
        for query in [{}, {"o": "cost"}, {"o": "-input"}, {"q": "alice", "from": day(5), "to": day(0)}]:
            get_spend(admin_client, **query)
        assert admin_client.get(reverse(BUDGETS), {"o": "-3"}).status_code == 200
        assert admin_client.get(reverse(RECORDS), {"day": day(0), "outcome": "done"}).status_code == 200
        assert admin_client.get(reverse(RECORDS), {"day__gte": day(5), "day__lte": day(0)}).status_code == 200
        page = admin_client.get(reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk]))
        assert page.status_code == 200
    sql = [q["sql"] for q in queries.captured_queries]
    assert any("turn" in s.lower() for s in sql)
    assert not [s for s in sql if DATE_FUNCTIONS.search(s)]


# --- each turn's record ---------------------------------------------------------------------


def test_the_records_list_filters_and_searches(admin_client, spend):
    record("dave", usage.today(), "0", outcome="model_error", agent="datadog", thread="thread-x")
    changelist = reverse(RECORDS)
    response = admin_client.get(changelist)
    assert response.status_code == 200 and response.context["cl"].result_count == 7
    page = response.content.decode()
    headers = re.findall(r'<th scope="col"[^>]*class="[^"]*column-(\w+)', page)
    assert headers[:4] == ["started_at", "resource_id", "thread_id", "agent"] and "cost" in headers
    assert "Spend per resource and day" in page
    assert admin_client.get(changelist, {"outcome": "model_error"}).context["cl"].result_count == 1
    assert admin_client.get(changelist, {"agent": "datadog"}).context["cl"].result_count == 1
    assert admin_client.get(changelist, {"q": "thread-x"}).context["cl"].result_count == 1
    assert admin_client.get(changelist, {"q": spend[0].turn_id}).context["cl"].result_count == 1
    assert admin_client.get(changelist, {"q": "bob"}).context["cl"].result_count == 2
    assert admin_client.get(changelist, {"o": "-10"}).context["cl"].result_list[0].resource_id == "bob"


def test_a_record_is_read_only_and_stays(admin_client, spend):
    rec = spend[0]
    assert admin_client.get(reverse("admin:sessions_app_turnrecord_add")).status_code == 403
    change = reverse("admin:sessions_app_turnrecord_change", args=[rec.pk])
    response = admin_client.get(change)
    assert response.status_code == 200
    assert not response.context["adminform"].form.fields
    page = response.content.decode()
    for text in (rec.turn_id, "alice", "claude-test", "$0.100000", "1200 ms", "300 ms", "thread-1 (deleted)"):
        assert text in page, text
    admin_client.post(change, {"cost_usd": "0"})
    assert TurnRecord.objects.get(pk=rec.pk).cost_usd == Decimal("0.1")
    delete = reverse("admin:sessions_app_turnrecord_delete", args=[rec.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert TurnRecord.objects.filter(pk=rec.pk).exists()


# --- the thread's page --------------------------------------------------------------------------


def test_the_thread_page_shows_its_cost_and_turns(admin_client, monkeypatch):
    mapping = async_to_sync(services.save_session)("thread-1", "alice", "sess-1", agent="smart")
    for n, cost in enumerate(["0.000128", "0.000131", "0.2"]):
        usage.record_turn_sync({
            "turn_id": f"t-{n}", "resource_id": "alice", "thread_id": "thread-1", "agent": "smart",
            "model": "claude-test", "started_at": datetime.now(UTC) - timedelta(minutes=10 - n),
            "duration_ms": 800, "first_text_ms": 90, "outcome": "done" if n < 2 else "interrupted",
            "worker": "w1", "input_tokens": 7, "output_tokens": 5, "cost_usd": cost})
    record("alice", usage.today(), "5", thread="thread-2")  # another thread
    record("bob", usage.today(), "5", thread="thread-1")  # another resource's thread-1
    mapping.refresh_from_db()
    assert mapping.cost_usd == Decimal("0.200259")

    page = admin_client.get(reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk]))
    assert page.status_code == 200
    text = page.content.decode()
    assert "$0.200259" in text
    assert re.findall(r'data-turn-record="([^"]+)"', text) == ["t-2", "t-1", "t-0"]  # newest first
    assert "interrupted" in text and "$0.000128" in text
    assert "These turns in the usage records" in text
    assert "resource_id=alice&amp;thread_id=thread-1" in text

    monkeypatch.setattr(sessions_admin, "THREAD_TURNS_SHOWN", 2)
    text = admin_client.get(
        reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk])).content.decode()
    assert re.findall(r'data-turn-record="([^"]+)"', text) == ["t-2", "t-1"]
    assert "Only the latest 2 are shown" in text


def test_a_thread_without_turns(admin_client):
    mapping = async_to_sync(services.save_session)("thread-1", "alice", "sess-1", agent="smart")
    text = admin_client.get(
        reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk])).content.decode()
    assert "No turns recorded." in text and "$0.000000" in text
    assert isinstance(mapping, SessionMapping)


# --- a libSQL server (no date functions) ------------------------------------------------------

REMOTE_SCRIPT = """
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from django.db import connection
from django.test import Client
from django.test.utils import setup_test_environment
from django.contrib.auth import get_user_model
from django.urls import reverse

from sessions_app import usage
from sessions_app.models import ResourceBudget, SessionMapping, TurnRecord

setup_test_environment()
assert connection.vendor == "sqlite" and connection.is_remote, connection.settings_dict
today = usage.today()
mapping = SessionMapping.objects.create(thread_id="t1", resource_id="r1", session_id="s1",
                                        cost_usd=Decimal("0.25"))
for i, (resource, ago, cost) in enumerate([("r1", 0, "0.1"), ("r1", 0, "0.15"), ("r2", 2, "1.5"),
                                           ("<b>r3</b>", 5, "0.5")]):
    day = today - timedelta(days=ago)
    TurnRecord.objects.create(
        turn_id=f"turn-{i}", resource_id=resource, thread_id="t1", agent="smart", model="m",
        started_at=datetime.combine(day, time(12), tzinfo=UTC), day=day, outcome="done",
        input_tokens=10 * (i + 1), output_tokens=i, cost_usd=Decimal(cost))
client = Client()
client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123"))
spend = reverse("admin:sessions_app_turnrecord_spend")
for query in [{}, {"o": "cost"}, {"o": "-input"}, {"o": "turns"}, {"o": "resource"}, {"q": "r1"},
              {"from": (today - timedelta(days=3)).isoformat(), "to": today.isoformat()},
              {"from": "bad"}]:
    response = client.get(spend, query)
    assert response.status_code == 200, (query, response.status_code)
rows = client.get(spend, {"o": "-cost"}).context["rows"]
assert [(r["resource_id"], r["turns"], r["cost"]) for r in rows] == [
    ("r2", 1, "$1.500000"), ("<b>r3</b>", 1, "$0.500000"), ("r1", 2, "$0.250000")], rows
page = client.get(spend).content.decode()
assert "<svg" in page and "&lt;b&gt;r3&lt;/b&gt;" in page and "<b>r3</b>" not in page
add = client.post(reverse("admin:sessions_app_resourcebudget_add"), {"resource_id": "r1", "daily_usd": "0.2"})
assert add.status_code == 302, add.content
assert usage.budget_for_sync("r1") == Decimal("0.2")
try:
    usage.check_budget_sync("r1")
except usage.BudgetExceeded:
    pass
else:
    raise AssertionError("r1 is over its budget")
budgets = client.get(reverse("admin:sessions_app_resourcebudget_changelist"), {"o": "-3"})
assert budgets.status_code == 200 and "over budget" in budgets.content.decode()
records = client.get(reverse("admin:sessions_app_turnrecord_changelist"),
                     {"day": today.isoformat(), "outcome": "done", "q": "r1"})
assert records.status_code == 200 and records.context["cl"].result_count == 2
thread = client.get(reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk])).content.decode()
assert "$0.250000" in thread and thread.count("data-turn-record=") == 2
print("REMOTE USAGE ADMIN OK")
"""


@pytest.mark.engine_agnostic  # its own database: the libSQL server
@pytest.mark.engine_agnostic  # on a libSQL server of its own, whatever the run's engine
def test_the_usage_admin_on_a_libsql_server(tmp_path):
    """The spend page (sorts, search, range), the budgets and the records
    over a remote libSQL connection, which has no SQL date functions
    (README, "The libSQL engine")."""
    from tests.test_engine_remote import on_a_libsql_server

    proc = on_a_libsql_server(tmp_path, REMOTE_SCRIPT, OMNI_DAILY_BUDGET_USD="0")
    assert "REMOTE USAGE ADMIN OK" in proc.stdout
