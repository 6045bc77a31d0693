"""Per-turn usage, totals and daily budgets (contract §10), in this process
(real SDK and CLI, offline model)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from chat_app.pool import pool
from chat_app.turns import start_turn
from sessions_app import usage
from sessions_app.models import ResourceBudget, SessionMapping, TurnRecord
from tests.helpers import turn_bodies

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]


body = turn_bodies("una")


async def run(message, thread, resource="una"):
    turn = await start_turn(None, body(message, thread, resource))
    return turn, [event async for event in turn.listen()]


async def test_each_turn_on_a_warm_client_reports_its_own_cost(offline_chat):
    """The CLI's total_cost_usd runs on across a warm process's turns; done
    and the record carry each turn's own, the same for identical turns."""
    done, running_totals = [], []
    for i in range(4):
        turn, events = await run("Same question", "warm-cost")
        assert events[-1]["type"] == "done"
        done.append(events[-1]["result"])
        running_totals.append(next(e["chunk"]["total_cost_usd"] for e in events
                                   if e["type"] == "chunk" and e["chunk"]["kind"] == "ResultMessage"))
    assert ("una", "warm-cost") in pool.idle  # all on one warm client after the first
    costs = [d["costUsd"] for d in done]
    # the process's running totals (in each turn's ResultMessage chunk) against the turns' own
    totals = [t for t in running_totals]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(sum(costs))
    assert costs == pytest.approx([totals[0]] + [b - a for a, b in zip(totals, totals[1:])])
    assert all(0 < c < totals[0] * 2 for c in costs), costs  # each its own, not the total
    assert all(set(d["usage"]) == {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens"} for d in done)
    records = [r async for r in TurnRecord.objects.filter(thread_id="warm-cost").order_by("started_at")]
    assert [float(r.cost_usd) for r in records] == pytest.approx(costs)
    assert all(r.outcome == "done" and r.input_tokens > 0 and r.output_tokens > 0 for r in records)
    assert all(r.first_text_ms is not None and r.duration_ms >= r.first_text_ms for r in records)
    assert records[0].model and records[0].agent == "smart" and records[0].worker
    mapping = await SessionMapping.objects.aget(thread_id="warm-cost")
    assert float(mapping.cost_usd) == pytest.approx(sum(costs))
    response = await AsyncClient().post("/api/sessions/metadata", {"threadId": "warm-cost", "resourceId": "una"},
                                        content_type="application/json")
    assert response.json()["session"]["costUsd"] == pytest.approx(sum(costs))


async def test_an_interrupted_or_failed_turn_is_recorded_with_its_outcome(offline_chat):
    turn = await start_turn(None, body("Long [slow]", "cut"))
    async for event in turn.listen():
        if event["type"] == "text":
            break
    await turn.interrupt()
    events = [e async for e in turn.listen()]
    record = await TurnRecord.objects.aget(turn_id=turn.turn_id)
    assert record.outcome == "interrupted" and float(record.cost_usd) == pytest.approx(
        events[-1]["result"]["costUsd"])
    failing, events = await run("boom [fail]", "failing")
    record = await TurnRecord.objects.aget(turn_id=failing.turn_id)
    assert record.outcome == "model_error" and events[-1]["result"]["isError"] is True


async def test_usage_sums_per_day_and_checks_its_range(offline_chat):
    today = usage.today()
    for days_ago, cost in ((0, "0.5"), (0, "0.25"), (1, "1"), (40, "9")):
        started = timezone.now() - timedelta(days=days_ago)
        await usage.record_turn({"turn_id": f"t{days_ago}-{cost}", "resource_id": "una", "thread_id": "x",
                                 "started_at": started, "outcome": "done", "input_tokens": 10,
                                 "output_tokens": 2, "cost_usd": Decimal(cost)})
    await usage.record_turn({"turn_id": "other", "resource_id": "vic", "thread_id": "y",
                             "started_at": timezone.now(), "outcome": "done", "cost_usd": Decimal("7")})
    client = AsyncClient()
    got = (await client.get("/api/usage", {"resourceId": "una"})).json()
    assert got["to"] == today.isoformat() and got["from"] == (today - timedelta(days=29)).isoformat()
    assert got["total"] == {"turns": 3, "inputTokens": 30, "outputTokens": 6, "costUsd": 1.75}
    assert [d["date"] for d in got["days"]] == [(today - timedelta(days=1)).isoformat(), today.isoformat()]
    assert got["days"][1]["costUsd"] == 0.75 and got["days"][1]["turns"] == 2
    assert got["budget"] == {"dailyUsd": None, "spentTodayUsd": 0.75,
                             "resetsAt": usage.next_midnight().isoformat().replace("+00:00", "Z")}
    wide = (await client.get("/api/usage", {"resourceId": "una", "from": (today - timedelta(days=45)).isoformat()})).json()
    assert wide["total"]["turns"] == 4
    for bad in ({"from": "2026-13-01"}, {"from": "yesterday"}, {"from": "2026-02-02", "to": "2026-02-01"},
                {"from": "2020-01-01", "to": "2026-01-01"}):
        response = await client.get("/api/usage", {"resourceId": "una", **bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request", bad


async def test_a_resource_over_its_budget_is_refused_until_midnight(offline_chat, settings):
    settings.OMNI_DAILY_BUDGET_USD = 0.0001  # one turn of the offline model is over it
    _, events = await run("Hello", "budget-1")
    assert events[-1]["type"] == "done"
    with pytest.raises(usage.BudgetExceeded) as refused:
        await start_turn(None, body("Again", "budget-1"))
    left = (usage.next_midnight() - timezone.now()).total_seconds()
    assert refused.value.status == 429 and abs(refused.value.retry_after - left) <= 2
    response = await AsyncClient().post("/api/chat", {"message": "SSE too", "threadId": "budget-2",
                                                      "resourceId": "una"}, content_type="application/json")
    assert response.status_code == 429 and response.json()["error"]["code"] == "budget_exceeded"
    assert abs(int(response["Retry-After"]) - left) <= 2
    # another resource is not affected; a resource's own budget overrides the default
    _, events = await run("Me?", "budget-3", resource="vic")
    assert events[-1]["type"] == "done"
    await ResourceBudget.objects.acreate(resource_id="una", daily_usd=None)  # no cap for una
    _, events = await run("Now?", "budget-1")
    assert events[-1]["type"] == "done"
    # the next UTC day (a test clock, not a sleep): the day's spend starts over
    await ResourceBudget.objects.filter(resource_id="una").adelete()
    tomorrow = usage.today() + timedelta(days=1)
    original = usage.today
    usage.today = lambda: tomorrow
    try:
        _, events = await run("A new day", "budget-1")
        assert events[-1]["type"] == "done"
    finally:
        usage.today = original


@pytest.mark.parametrize("spent, budget, shown", [
    (["0.002"], "0.002", "($0.002 of $0.002)"),  # not "of $0.00"
    (["0.00151234", "0.001"], "0.0025", "($0.00251234 of $0.0025)"),
    (["3", "2.5"], "5", "($5.50 of $5.00)"),
    (["0.1"], "0.1", "($0.10 of $0.10)"),
])
async def test_a_budget_refusal_shows_both_amounts_with_every_digit_they_have(settings, spent, budget, shown):
    settings.OMNI_DAILY_BUDGET_USD = float(budget)
    for n, cost in enumerate(spent):
        await usage.record_turn({"turn_id": f"digits-{n}", "resource_id": "una", "thread_id": "x",
                                 "started_at": timezone.now(), "outcome": "done", "cost_usd": Decimal(cost)})
    with pytest.raises(usage.BudgetExceeded) as refused:
        await sync_to_async(usage.check_budget_sync)("una")
    assert shown in refused.value.message, refused.value.message
