"""Tools and approvals in this process (real SDK and CLI, the offline model
calling tools on request): the built-in tools as the caller, tool events,
the audit rows, and a call that waits for a person (allow, deny, expire,
interrupt, a new message meanwhile, a deleted thread, no process held)."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async

from chat_app import approvals
from chat_app.pool import pool
from chat_app.turns import registry, start_turn
from sessions_app import selectors, services
from sessions_app.errors import Conflict, Forbidden, NotFound
from sessions_app.models import ToolCall
from tests.helpers import events_of, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]


body = turn_bodies("tess")


def decision(call_or_id, choice, thread, resource="tess", message=None):
    approval_id = call_or_id if isinstance(call_or_id, str) else call_or_id["approvalId"]
    return SimpleNamespace(threadId=thread, resourceId=resource, approvalId=approval_id,
                           decision=choice, message=message)


async def until(turn, kind, timeout=30):
    async def first():
        async for event in turn.listen():
            if event["type"] == kind:
                return event

    return await asyncio.wait_for(first(), timeout)


def text(events):
    return "".join(e["text"] for e in events if e["type"] == "text")


def kinds(events):
    return [e["type"] for e in events if e["type"] not in ("chunk", "text")]


async def seed(thread, message, resource="tess"):
    """A finished conversation of ``resource`` (no tools)."""
    events = await events_of(await start_turn(None, body(message, thread, resource, agent="datadog")))
    assert events[-1]["type"] == "done"


async def test_a_tool_runs_as_the_caller_and_its_events_and_audit_follow(offline_chat):
    await seed("cats", "Tell me about cats and their whiskers")
    await seed("other-cats", "cats of another resource", resource="mallory")
    turn = await start_turn(None, body('Find it [tool search_conversations {"query": "whiskers"}]', "t-1"))
    events = await events_of(turn)
    assert kinds(events) == ["session", "tool_use", "tool_result", "done"]
    use = next(e for e in events if e["type"] == "tool_use")
    result = next(e for e in events if e["type"] == "tool_result")
    assert use["tool"] == "mcp__omni__search_conversations" and use["input"] == {"query": "whiskers"}
    assert result["toolUseId"] == use["toolUseId"] and result["isError"] is False
    found = json.loads(result["text"])["matches"]
    assert [m["threadId"] for m in found] == ["cats"]
    assert "whiskers" in text(events)  # the reply quotes the result
    assert {e["turnId"] for e in events} == {turn.turn_id}
    row = await ToolCall.objects.aget(tool_use_id=use["toolUseId"])
    assert (row.status, row.resource_id, row.thread_id, row.turn_id) == ("done", "tess", "t-1", turn.turn_id)
    assert row.needs_approval is False and "cats" in row.result and row.duration_ms is not None


async def test_a_tool_never_reaches_another_resources_thread(offline_chat):
    """The model asks for mallory's thread by its id: as if it did not exist."""
    await seed("secret", "mallory's secret plans", resource="mallory")
    events = await events_of(await start_turn(
        None, body('[tool read_conversation {"threadId": "secret"}]', "t-2")))
    result = next(e for e in events if e["type"] == "tool_result")
    assert "no conversation" in result["text"] and "plans" not in json.dumps(events)
    events = await events_of(await start_turn(
        None, body('[tool search_conversations {"query": "plans"}]', "t-3")))
    assert json.loads(next(e for e in events if e["type"] == "tool_result")["text"])["matches"] == []


async def waiting_turn(thread, target, resource="tess"):
    turn = await start_turn(None, body(f'Delete it [tool delete_conversation {{"threadId": "{target}"}}]',
                                       thread, resource))
    request = await until(turn, "approval_request")
    assert request["tool"] == "mcp__omni__delete_conversation" and request["input"] == {"threadId": target}
    await wait_for_async(lambda: turn.waiting, timeout=20, message="the turn waits for the decision")
    return turn, request


async def test_allow_runs_the_call_once_and_the_turn_goes_on(offline_chat):
    await seed("old", "an old conversation")
    turn, request = await waiting_turn("t-allow", "old")
    # waiting holds no Claude process and no slot of the budget
    assert pool.counts()["running"] == 0
    assert (await selectors.get_mapping("old", "tess")) is not None  # not run yet
    with pytest.raises(Conflict) as busy:  # the thread is busy while its call waits
        await start_turn(None, body("meanwhile", "t-allow"))
    assert busy.value.code == "thread_busy" and busy.value.retry_after >= 1
    assert await approvals.decide(None, decision(request, "allow", "t-allow")) == {
        "approvalId": request["approvalId"], "decision": "allow"}
    events = await asyncio.wait_for(events_of(turn), 30)
    assert kinds(events) == ["session", "tool_use", "approval_request", "approval", "tool_result", "done"]
    approval = next(e for e in events if e["type"] == "approval")
    assert approval == {**approval, "decision": "allow", "by": "tess", "approvalId": request["approvalId"]}
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert await selectors.get_mapping("old", "tess") is None  # it ran
    assert 'deleted' in next(e for e in events if e["type"] == "tool_result")["text"]
    row = await ToolCall.objects.aget(approval_id=request["approvalId"])
    assert (row.status, row.decision, row.decided_by, row.continued_by) == ("done", "allow", "tess", turn.turn_id)
    with pytest.raises(approvals.AlreadyDecided):
        await approvals.decide(None, decision(request, "deny", "t-allow"))
    # the conversation goes on: a new message, and the mapping is free again
    after = await events_of(await start_turn(None, body("And now?", "t-allow")))
    assert after[-1]["type"] == "done" and after[0]["resumed"] is True


async def test_deny_never_runs_the_call_and_the_model_is_told(offline_chat):
    await seed("keep", "keep me")
    turn, request = await waiting_turn("t-deny", "keep")
    await approvals.decide(None, decision(request, "deny", "t-deny", message="not that one"))
    events = await asyncio.wait_for(events_of(turn), 30)
    assert events[-1]["type"] == "done" and events[-1]["result"]["isError"] is False
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["isError"] is True and "not that one" in result["text"]
    assert "was refused" in text(events)
    assert await selectors.get_mapping("keep", "tess") is not None
    row = await ToolCall.objects.aget(approval_id=request["approvalId"])
    assert (row.status, row.decision) == ("refused", "deny")


async def test_an_unanswered_call_expires_and_never_runs(offline_chat):
    offline_chat.OMNI_APPROVAL_TIMEOUT_SECONDS = 1
    await seed("stay", "stay here")
    turn, request = await waiting_turn("t-expire", "stay")
    events = await asyncio.wait_for(events_of(turn), 30)
    approval = next(e for e in events if e["type"] == "approval")
    assert (approval["decision"], approval["by"]) == ("expired", "timeout")
    assert "expired" in next(e for e in events if e["type"] == "tool_result")["text"]
    assert events[-1]["type"] == "done" and await selectors.get_mapping("stay", "tess") is not None
    with pytest.raises(NotFound):
        await approvals.decide(None, decision(request, "allow", "t-expire"))


async def test_interrupting_a_waiting_turn_denies_the_call(offline_chat):
    await seed("spare-me", "spare me")
    turn, request = await waiting_turn("t-stop", "spare-me")
    await turn.interrupt()
    events = await asyncio.wait_for(events_of(turn), 30)
    approval = next(e for e in events if e["type"] == "approval")
    assert (approval["decision"], approval["by"]) == ("deny", "interrupt")
    assert events[-1]["type"] == "done" and await selectors.get_mapping("spare-me", "tess") is not None


async def test_a_thread_deleted_while_its_call_waits_ends_the_turn_and_the_call_never_runs(offline_chat):
    await seed("victim", "victim")
    turn, request = await waiting_turn("t-gone", "victim")
    await services.delete_session("t-gone", "tess")
    events = await asyncio.wait_for(events_of(turn), 10)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "thread_deleted"
    assert await selectors.get_mapping("victim", "tess") is not None
    assert not await ToolCall.objects.filter(thread_id="t-gone").aexists()  # the audit goes with it
    with pytest.raises(NotFound):
        await approvals.decide(None, decision(request, "allow", "t-gone"))


async def test_bad_decisions(offline_chat):
    await seed("x", "x")
    turn, request = await waiting_turn("t-bad", "x")
    with pytest.raises(NotFound):
        await approvals.decide(None, decision("0" * 32, "allow", "t-bad"))
    with pytest.raises(NotFound):  # the right id, another thread
        await approvals.decide(None, decision(request, "allow", "t-other"))
    offline_chat.OMNI_AUTH = "required"
    from django.contrib.auth import get_user_model

    mallory = await sync_to_async(get_user_model().objects.create_user)("mallory")
    with pytest.raises(Forbidden):
        await approvals.decide(mallory, decision(request, "allow", "t-bad", resource="tess"))
    offline_chat.OMNI_AUTH = "off"
    await approvals.decide(None, decision(request, "deny", "t-bad"))
    await asyncio.wait_for(events_of(turn), 30)


async def test_a_decided_call_whose_turn_is_gone_is_continued_by_the_sweeper(offline_chat):
    """The worker that waited stopped (here: the turn detached, as at a
    shutdown); a decision made later still runs the call once and the
    conversation goes on, in a turn of its own that followers find."""
    await seed("later", "later")
    turn, request = await waiting_turn("t-sweep", "later")
    turn.detach()
    events = await asyncio.wait_for(events_of(turn), 10)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "turn_lost"
    assert registry.get("tess", "t-sweep") is None
    with pytest.raises(Conflict):  # still busy: its call waits
        await start_turn(None, body("meanwhile", "t-sweep"))
    approvals.start_sweeper()  # as the server does at its start (chat_app.lifecycle.startup)
    await approvals.decide(None, decision(request, "allow", "t-sweep"))

    resumed = await wait_for_async(lambda: registry.get("tess", "t-sweep"), timeout=10,
                                   message="the continuation started")
    assert resumed.turn_id != turn.turn_id
    rest = await asyncio.wait_for(events_of(resumed), 30)
    assert kinds(rest) == ["session", "approval", "tool_result", "done"]
    assert rest[0]["resumed"] is True
    assert await selectors.get_mapping("later", "tess") is None
    await approvals.stop_sweeper()
    assert await approvals.sweep() == []  # continued once
    row = await ToolCall.objects.aget(approval_id=request["approvalId"])
    assert row.status == "done" and row.continued_by == resumed.turn_id


async def test_a_reload_shows_the_tool_calls_and_the_waiting_request(offline_chat):
    """/api/sessions/messages: an assistant message's toolCalls, with its
    decision, or the approval id of a call that still waits."""
    from django.test import AsyncClient

    await seed("to-go", "to go")
    turn, request = await waiting_turn("t-reload", "to-go")
    client = AsyncClient()

    async def tool_calls():
        response = await client.get("/api/sessions/messages", {"threadId": "t-reload", "resourceId": "tess"})
        assert response.status_code == 200
        return [c for m in response.json()["messages"] for c in m.get("toolCalls", [])]

    listed = await client.get("/api/sessions", {"resourceId": "tess"})
    waiting = {s["threadId"]: s["pendingApprovalId"] for s in listed.json()["sessions"]}
    assert waiting == {"t-reload": request["approvalId"], "to-go": None}
    (call,) = await tool_calls()
    assert call["tool"] == "mcp__omni__delete_conversation" and call["input"] == {"threadId": "to-go"}
    assert call["result"] is None
    assert call["approval"] == {"decision": None, "by": None, "approvalId": request["approvalId"],
                                "expiresAt": request["expiresAt"]}
    await approvals.decide(None, decision(request, "allow", "t-reload"))
    await asyncio.wait_for(events_of(turn), 30)
    (call,) = await tool_calls()
    assert call["approval"] == {"decision": "allow", "by": "tess"} and "deleted" in call["result"]
    listed = await client.get("/api/sessions", {"resourceId": "tess"})
    assert [s["pendingApprovalId"] for s in listed.json()["sessions"]] == [None]


async def test_an_external_mcp_server_sees_only_the_env_its_preset_names(offline_chat, monkeypatch):
    """A stdio MCP server of the tests' own in a preset: its tool is called,
    and its process sees PATH and exactly the env the preset names (none of
    the server's secrets, nor the CLI's API key)."""
    import sys
    from pathlib import Path

    monkeypatch.setenv("OMNI_SECRET_KEY", "never-for-tools")
    monkeypatch.setenv("DATABASE_PASSWORD", "never-either")
    script = Path(__file__).with_name("mcp_probe_server.py")
    offline_chat.OMNI_AGENTS = {**offline_chat.OMNI_AGENTS, "prober": {
        "system_prompt": "You probe.", "tools": [],
        "mcp_servers": {"probe": {"command": sys.executable, "args": [str(script)],
                                  "env": {"PROBE_TOKEN": "t0k"}, "tools": ["env_keys", "shout"]}},
    }}
    events = await events_of(await start_turn(None, body("[tool env_keys] then [tool shout {\"text\": \"hi\"}]",
                                                          "t-ext", agent="prober")))
    results = [e for e in events if e["type"] == "tool_result"]
    assert [e["tool"] for e in events if e["type"] == "tool_use"] == ["mcp__probe__env_keys", "mcp__probe__shout"]
    assert not any(r["isError"] for r in results), results
    seen = set(json.loads(json.loads(results[0]["text"])["result"]))
    # LC_CTYPE: Python's own C-locale coercion in the server process
    assert "PROBE_TOKEN" in seen and seen <= {"PATH", "PROBE_TOKEN", "LC_CTYPE"}, seen
    assert json.loads(results[1]["text"]) == {"result": "HI"}
    rows = [r async for r in ToolCall.objects.filter(thread_id="t-ext").order_by("id")]
    assert [(r.tool, r.status) for r in rows] == [("mcp__probe__env_keys", "done"), ("mcp__probe__shout", "done")]


async def test_warm_clients_and_forks_carry_tool_using_turns(offline_chat):
    await seed("zebra", "zebras are striped")
    first = await events_of(await start_turn(None, body('[tool search_conversations {"query": "zebra"}]', "t-warm")))
    assert first[-1]["type"] == "done"
    assert ("tess", "t-warm") in pool.idle  # kept warm after a tool-using turn
    again = await events_of(await start_turn(None, body('Once more [tool search_conversations {"query": "striped"}]',
                                                        "t-warm")))
    assert again[-1]["type"] == "done" and '"zebra"' in next(
        e for e in again if e["type"] == "tool_result")["text"]
    fork = SimpleNamespace(message="And in the fork?", threadId="t-warm-fork", forkFromThreadId="t-warm",
                           resourceId="tess", agent=None, atMessageUuid=None)
    forked = await events_of(await start_turn(None, fork, fork=True))
    assert forked[-1]["type"] == "done"
    assert 'Earlier questions: "[tool search_conversations' in text(forked)
    assert "Once more" in text(forked)


async def test_a_project_adds_its_own_tool_with_a_module_and_one_line(offline_chat, monkeypatch):
    """``<app>/omni_tools.py`` registers it; one line in a preset gives it to an agent."""
    from chat_app import tools

    offline_chat.INSTALLED_APPS = [*offline_chat.INSTALLED_APPS, "tests.toolapp"]
    monkeypatch.setattr(tools, "_discovered", False)
    monkeypatch.setitem(offline_chat.OMNI_AGENTS["smart"], "tools",
                        [*offline_chat.OMNI_AGENTS["smart"]["tools"], "count_threads"])
    await seed("one", "one")
    events = await events_of(await start_turn(None, body("[tool count_threads]", "t-own")))
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["text"] == "tess has 2 conversations" and not result["isError"]
