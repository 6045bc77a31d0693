"""Approvals against a live daphne server (real SDK, CLI and offline model):
a pending call holds no Claude process, a decision after the websocket
dropped and came back, and a decision after the server was SIGKILLed and
restarted: the tool runs once, only after the decision, and the reply
follows. (Across two workers: tests/test_scale_out.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e import WSClient, new_id, serving
from tests.helpers import wait_for_async

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # one warm client at most, no spares: the CLI processes are easy to count
    yield from serving(tmp_path_factory, extra_env={"OMNI_WARM_CLIENTS": "1"})


def delete_marker(target: str) -> str:
    return f'Please delete it [tool delete_conversation {{"threadId": "{target}"}}]'


def seed(server, resource: str) -> str:
    thread = new_id("old")
    server.chat("an old conversation", resource, thread, agent="datadog").assert_ok()
    return thread


def exists(server, thread: str, resource: str) -> bool:
    status, _ = server.metadata(thread, resource)
    return status == 200


async def wait_request(ws: WSClient, frame: dict) -> dict:
    await ws.send(frame)
    events = await ws.recv_until("approval_request", "done", "error")
    assert events[-1]["type"] == "approval_request", events[-1]
    return events[-1]


def running(server) -> int:
    status, _, data = server.request("GET", "/api/health")
    return data["processes"]["running"]


async def test_a_waiting_call_holds_no_process_and_a_reconnected_socket_decides_it(server):
    resource, thread = new_id("user"), new_id("thread")
    target = seed(server, resource)
    frame = {"type": "message", "message": delete_marker(target), "threadId": thread, "resourceId": resource}
    async with await WSClient.connect(server) as ws:
        request = await wait_request(ws, frame)
        turn_id, last = request["turnId"], request["seq"]
    # the CLI of the waiting turn exits: at most the datadog warm client is left
    await wait_for_async(lambda: not running(server) and len(server.cli_children()) <= 1, timeout=10,
                         interval=0.1, message=lambda: (running(server), server.cli_children()))
    assert exists(server, target, resource)
    async with await WSClient.connect(server) as ws:  # the page came back
        await ws.send({"type": "follow", "threadId": thread, "resourceId": resource,
                       "turnId": turn_id, "afterSeq": last})
        await ws.send({"type": "message", "message": "meanwhile", "threadId": thread, "resourceId": resource})
        busy = await ws.recv(timeout=10)
        assert busy["type"] == "error" and busy["code"] == "thread_busy" and "turnId" not in busy
        await ws.send({"type": "approval", "threadId": thread, "resourceId": resource,
                       "approvalId": request["approvalId"], "decision": "allow"})
        rest = await ws.recv_until("done", "error")
    kinds = [e["type"] for e in rest if e["type"] not in ("chunk", "text")]
    assert kinds == ["approval", "tool_result", "done"]
    assert rest[0]["seq"] == last + 1 and {e["turnId"] for e in rest} == {turn_id}
    assert not exists(server, target, resource)
    async with await WSClient.connect(server) as ws:  # decided once
        await ws.send({"type": "approval", "threadId": thread, "resourceId": resource,
                       "approvalId": request["approvalId"], "decision": "deny"})
        again = await ws.recv(timeout=10)
    assert again["type"] == "error" and again["code"] == "already_decided" and again["threadId"] == thread


async def test_a_decision_after_the_server_was_killed_and_restarted(server):
    resource, thread = new_id("user"), new_id("thread")
    target = seed(server, resource)
    frame = {"type": "message", "message": delete_marker(target), "threadId": thread, "resourceId": resource}
    async with await WSClient.connect(server) as ws:
        request = await wait_request(ws, frame)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    server.proc = None
    server.start()
    assert exists(server, target, resource)  # nothing ran meanwhile
    status, _, listed = server.request("GET", f"/api/sessions?resourceId={resource}")
    assert {s["threadId"]: s["pendingApprovalId"] for s in listed["sessions"]}[thread] == request["approvalId"]
    status, _, data = server.request("GET", f"/api/sessions/messages?threadId={thread}&resourceId={resource}")
    calls = [c for m in data["messages"] for c in m.get("toolCalls", [])]
    assert calls[-1]["approval"]["approvalId"] == request["approvalId"]  # the reloaded page can answer it
    status, _, decided = server.request("POST", "/api/chat/approval", {
        "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"], "decision": "allow"})
    assert status == 200 and decided == {"approvalId": request["approvalId"], "decision": "allow"}
    async with await WSClient.connect(server) as ws:  # the conversation goes on: follow the thread
        await ws.send({"type": "follow", "threadId": thread, "resourceId": resource})
        rest = await ws.recv_until("done", "error")
    if rest[0]["type"] == "approval_request":  # the continuation had not started yet: the request replayed
        assert rest[0]["approvalId"] == request["approvalId"]
        rest = rest[1:]
    kinds = [e["type"] for e in rest if e["type"] not in ("chunk", "text")]
    assert kinds == ["session", "approval", "tool_result", "done"], kinds
    assert rest[0]["resumed"] is True
    assert not exists(server, target, resource)
    status, _, second = server.request("POST", "/api/chat/approval", {
        "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"], "decision": "allow"})
    assert status == 409 and second["error"]["code"] == "already_decided"
    # bad input
    for bad, code in (({"decision": "maybe"}, 400), ({"approvalId": "f" * 32}, 404),
                      ({"resourceId": new_id("other")}, 404)):
        status, _, answer = server.request("POST", "/api/chat/approval", {
            "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"],
            "decision": "allow", **bad})
        assert status == code, (bad, answer)
