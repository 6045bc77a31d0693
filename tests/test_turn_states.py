"""The turn as a state machine (chat_app/turns/states.py) and the one
admission path (chat_app/turns/admission.py), on the real SDK and CLI:
the states a turn goes through, its ending decided once, and a
continuation after an approval admitted like any turn (a resource over its
budget spends nothing more by allowing calls)."""

import asyncio
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async

from chat_app import approvals, metrics
from chat_app.pool import pool
from chat_app.turns import TurnSpec, registry, start_turn
from chat_app.turns.runner import Turn
from chat_app.turns.states import TRANSITIONS, BadTransition, Ending, State
from sessions_app import selectors, usage
from chat_app.models import ThreadLease
from sessions_app.models import ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]

S = State


def body(message, thread, resource="tess"):
    return SimpleNamespace(message=message, threadId=thread, resourceId=resource, agent=None)


async def events_of(turn, timeout=60):
    async def collect():
        return [event async for event in turn.listen()]

    return await asyncio.wait_for(collect(), timeout)


async def until_waiting(turn, timeout=30):
    async def poll():
        while not turn.waiting:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def refused(code: str) -> float:
    return metrics.REGISTRY.get_sample_value("omni_turns_refused_total", {"code": code}) or 0.0


# --- the table -----------------------------------------------------------------------

def test_every_state_but_ended_can_reach_the_end_and_ended_is_final():
    assert TRANSITIONS[S.ENDED] == frozenset()
    for state in State:
        seen, todo = set(), [state]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert state is S.ENDED or S.ENDED in seen, state
        # the last save comes before the end, from everywhere
        assert state in (S.FINISHING, S.ENDED) or S.FINISHING in TRANSITIONS[state], state


def test_a_move_the_table_does_not_allow_is_refused():
    turn = Turn(TurnSpec("tess", "t", "hi", "default", {}), slot=None)
    assert turn.state is S.ADMITTED
    with pytest.raises(BadTransition):
        turn._enter(S.ENDED)  # never without the last save's state
    with pytest.raises(BadTransition):
        turn._enter(S.WAITING)
    turn._enter(S.STARTING)
    turn._enter(S.STARTING)  # staying is no move
    assert turn.history == [S.ADMITTED, S.STARTING]


def test_the_ending_is_decided_once():
    turn = Turn(TurnSpec("tess", "t", "hi", "default", {}), slot=None)
    first = turn._conclude({"type": "error", "code": "thread_deleted", "message": "gone"})
    later = turn._conclude({"type": "done", "result": {"isError": False}})
    assert later is first and first.outcome == "thread_deleted" and first.stopped
    assert Ending.of({"type": "done", "result": {"isError": False}}, interrupted=True).outcome == "interrupted"
    assert Ending.of({"type": "done", "result": {"isError": True}}).outcome == "model_error"


# --- turns, end to end -------------------------------------------------------------------

async def test_a_message_goes_admitted_starting_streaming_finishing_ended(offline_chat):
    turn = await start_turn(None, body("Hello", "st-1"))
    events = await events_of(turn)
    assert events[-1]["type"] == "done"
    assert turn.history == [S.ADMITTED, S.STARTING, S.STREAMING, S.FINISHING, S.ENDED]
    assert turn.saved and turn.ending.outcome == "done" and turn.finished
    # what the turn owned is back: its process kept warm, its lease let go
    assert pool.counts()["running"] == 0 and pool.counts()["warm"] == 1
    lease = await ThreadLease.objects.aget(resource_id="tess", thread_id="st-1")
    assert lease.turn_id == turn.turn_id and not (await sync_to_async(_live)(lease))


def _live(lease) -> bool:
    from django.utils import timezone

    return lease.expires_at > timezone.now()


async def test_a_model_error_is_saved_with_its_outcome(offline_chat):
    turn = await start_turn(None, body("boom [fail]", "st-2"))
    events = await events_of(turn)
    assert events[-1]["type"] == "done" and events[-1]["result"]["isError"] is True
    assert turn.history == [S.ADMITTED, S.STARTING, S.STREAMING, S.FINISHING, S.ENDED]
    assert turn.saved and turn.ending.outcome == "model_error"


async def test_a_stopped_turn_ends_once_without_its_last_save(offline_chat):
    turn = await start_turn(None, body("A long one [slow]", "st-5"))
    async for event in turn.listen():
        if event["type"] == "text":
            break
    assert turn.state is S.STREAMING
    assert await registry.abort(("tess", "st-5"), "thread_deleted", "the thread was deleted")
    await turn.abort("other", "a second stop changes nothing")
    events = await events_of(turn)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "thread_deleted"
    assert [e["type"] for e in events].count("error") == 1
    assert turn.history[-2:] == [S.FINISHING, S.ENDED] and not turn.saved
    assert turn.ending.stopped and pool.counts()["running"] == 0 and pool.counts()["warm"] == 0


async def test_an_approval_waits_then_continues_in_the_same_turn(offline_chat):
    await events_of(await start_turn(None, body("to delete", "st-old")))
    turn = await start_turn(None, body('Delete it [tool delete_conversation {"threadId": "st-old"}]', "st-3"))
    await until_waiting(turn)
    assert turn.state is S.WAITING and turn.slot is None and pool.counts()["running"] == 0
    call = await ToolCall.objects.aget(thread_id="st-3")
    await approvals.decide(None, SimpleNamespace(threadId="st-3", resourceId="tess", approvalId=call.approval_id,
                                                 decision="allow", message=None))
    events = await events_of(turn)
    assert events[-1]["type"] == "done"
    assert turn.history == [S.ADMITTED, S.STARTING, S.STREAMING, S.WAITING, S.CONTINUING, S.STREAMING,
                            S.FINISHING, S.ENDED]
    assert await selectors.get_mapping("st-old", "tess") is None  # the call ran


# --- one admission path ------------------------------------------------------------------------

async def _over_budget(settings, resource="tess"):
    """The resource has spent its day's budget (as a turn's record would say)."""
    settings.OMNI_DAILY_BUDGET_USD = 0.0001
    from django.utils import timezone

    await sync_to_async(usage.record_turn_sync)({
        "turn_id": "spent", "resource_id": resource, "thread_id": "elsewhere", "agent": "default",
        "model": "", "started_at": timezone.now(), "duration_ms": 1, "first_text_ms": None,
        "outcome": "done", "worker": "test", "input_tokens": 0, "output_tokens": 0,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 1.0})


async def test_a_waiting_turn_over_its_budget_is_refused_like_a_message(offline_chat, settings):
    await events_of(await start_turn(None, body("to keep", "st-keep")))
    turn = await start_turn(None, body('Delete it [tool delete_conversation {"threadId": "st-keep"}]', "st-4"))
    await until_waiting(turn)
    await _over_budget(settings)
    before = refused("budget_exceeded")
    with pytest.raises(usage.BudgetExceeded):  # a message is refused ...
        await start_turn(None, body("a message", "st-new"))
    assert refused("budget_exceeded") == before + 1
    call = await ToolCall.objects.aget(thread_id="st-4")
    await approvals.decide(None, SimpleNamespace(threadId="st-4", resourceId="tess", approvalId=call.approval_id,
                                                 decision="allow", message=None))
    events = await events_of(turn)
    # ... and so is the conversation going on after the decision: the call does not run
    assert events[-1]["type"] == "error" and events[-1]["code"] == "budget_exceeded"
    assert S.CONTINUING in turn.history and turn.history[-2:] == [S.FINISHING, S.ENDED]
    assert refused("budget_exceeded") == before + 2
    assert await selectors.get_mapping("st-keep", "tess") is not None
    call = await ToolCall.objects.aget(pk=call.pk)
    assert call.status == ToolCall.DECIDED and call.continued_by is None and call.started_at is None
    # the sweeper tries it like any turn: refused too, nothing started, no lease left running
    assert await approvals.sweep() == []
    assert refused("budget_exceeded") == before + 3
    assert registry.get("tess", "st-4") is None
    # once the budget allows it, the sweeper goes on with the call
    settings.OMNI_DAILY_BUDGET_USD = None
    started = await approvals.sweep()
    assert len(started) == 1
    rest = await events_of(started[0])
    assert rest[-1]["type"] == "done" and started[0].history[:3] == [S.ADMITTED, S.CONTINUING, S.STREAMING]
    assert await selectors.get_mapping("st-keep", "tess") is None


async def test_a_turn_cancelled_before_it_ran_gives_its_process_back_and_ends(offline_chat):
    """The loop closing under a turn admitted a moment ago: its task never
    ran its own cleanup, so the registry's callback has the turn let go."""
    spec = TurnSpec("tess", "st-6", "hi", "default", {})
    slot = pool.checkout(spec.key, agent="default", session_id=None, version=None, fork=False)
    assert pool.counts()["running"] == 1
    turn = registry.start(Turn(spec, slot))
    turn.task.cancel()
    events = await events_of(turn, timeout=10)
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "turn_failed"
    assert turn.history == [S.ADMITTED, S.FINISHING, S.ENDED]
    assert pool.counts()["running"] == 0 and registry.get("tess", "st-6") is None
