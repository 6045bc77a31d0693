"""A follow of a thread whose tool call waits, after the server restarted
(contract §9), against a live daphne (real SDK, CLI and offline model): the
SSE follow replays the pending ``approval_request`` and, once the call is
decided (``POST /api/chat/approval``), the same stream carries the
continuation to ``done``. (In this process: tests/test_follow_waiting.py.)"""

from __future__ import annotations

import json
import threading
import urllib.parse

import pytest

from tests.e2e import new_id, serving

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REQUEST_KEYS = ("type", "approvalId", "toolUseId", "tool", "input", "expiresAt", "turnId", "threadId")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a short heartbeat: the follow stays open (and says so) while the call waits
    yield from serving(tmp_path_factory, extra_env={"OMNI_SSE_HEARTBEAT_SECONDS": "1"})


def follow_path(thread: str, resource: str) -> str:
    return "/api/chat/stream?" + urllib.parse.urlencode({"threadId": thread, "resourceId": resource})


def test_an_sse_follow_after_a_restart_replays_the_request_and_carries_the_continuation(server):
    resource, thread, target = new_id("user"), new_id("thread"), new_id("old")
    server.chat("an old conversation", resource, target, agent="datadog").assert_ok()
    body = {"message": f'Please delete it [tool delete_conversation {{"threadId": "{target}"}}]',
            "threadId": thread, "resourceId": resource}
    with server.open_sse("/api/chat", body) as stream:
        request = stream.read_until("approval_request")
    server.restart()  # SIGTERM: the waiting turn lets go, the call waits on
    status, _, data = server.request("GET", f"/api/sessions?resourceId={resource}")
    assert {s["threadId"]: s["pendingApprovalId"] for s in data["sessions"]}[thread] == request["approvalId"]

    with server.open_sse(follow_path(thread, resource), None) as follow:
        assert follow.status == 200 and follow.is_stream, follow.result().body
        replayed = follow.next_event()
        assert {k: replayed[k] for k in REQUEST_KEYS} == {k: request[k] for k in REQUEST_KEYS}
        assert follow.ids[-1] == f"{replayed['turnId']}:{replayed['seq']}"
        # the stream stays open while the call waits: heartbeats, no event
        heartbeat = follow.resp.readline() + follow.resp.readline()
        assert heartbeat.startswith(b":"), heartbeat
        # the decision, on another connection; the rest reaches this stream
        answers = []
        decider = threading.Thread(target=lambda: answers.append(server.request("POST", "/api/chat/approval", {
            "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"],
            "decision": "allow"})))
        decider.start()
        rest = []
        while (event := follow.next_event()) is not None:
            rest.append(event)
        decider.join(30)
    assert answers and answers[0][0] == 200, answers
    kinds = [e["type"] for e in rest if e["type"] not in ("chunk", "text")]
    assert kinds == ["session", "approval", "tool_result", "done"], kinds
    assert rest[0]["resumed"] is True and rest[0]["turnId"] != request["turnId"]
    assert [e["seq"] for e in rest] == list(range(len(rest)))
    assert rest[1]["approvalId"] == request["approvalId"] and rest[1]["decision"] == "allow"
    assert "deleted" in next(e for e in rest if e["type"] == "tool_result")["text"]
    assert server.metadata(target, resource)[0] == 404  # it ran, once
    # nothing waits any more: a follow of the thread is a 404 again (after the turn's end)
    with server.open_sse(follow_path(thread, resource), None) as again:
        result = again.result()
    assert result.status == 404 and result.body["error"]["code"] == "not_found", json.dumps(result.body)


# --- two workers on Redis: the continuation starts on one, the follower is on the other -----


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.test_scale_out import running_cluster

    yield from running_cluster(tmp_path_factory, "follow-waiting")


@pytest.mark.engine_agnostic  # on PostgreSQL in every run
def test_a_follower_on_another_worker_gets_the_continuation_over_the_channel_layer(cluster):
    resource, thread, target = new_id("user"), new_id("thread"), new_id("old")
    cluster.a.chat("an old conversation", resource, target, agent="datadog").assert_ok()
    body = {"message": f'Please delete it [tool delete_conversation {{"threadId": "{target}"}}]',
            "threadId": thread, "resourceId": resource}
    with cluster.a.open_sse("/api/chat", body) as stream:
        request = stream.read_until("approval_request")
    cluster.a.restart()  # the worker that asked; B never ran the turn
    with cluster.b.open_sse(follow_path(thread, resource), None) as follow:
        assert follow.status == 200 and follow.is_stream, follow.result().body
        replayed = follow.next_event()
        assert {k: replayed[k] for k in REQUEST_KEYS} == {k: request[k] for k in REQUEST_KEYS}
        status, _, decided = cluster.a.request("POST", "/api/chat/approval", {
            "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"],
            "decision": "allow"})
        assert status == 200, decided
        rest = follow.result().events[1:]
    kinds = [e["type"] for e in rest if e["type"] not in ("chunk", "text")]
    assert kinds == ["session", "approval", "tool_result", "done"], kinds
    assert [e["seq"] for e in rest] == list(range(len(rest)))
    assert len({e["turnId"] for e in rest}) == 1 and rest[0]["turnId"] != request["turnId"]
    for worker in (cluster.a, cluster.b):
        assert worker.metadata(target, resource)[0] == 404
