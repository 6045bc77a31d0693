"""A follow of a thread whose tool call waits for a decision, after every
server process restarted (contract §9): no turn runs anywhere (the waiting
turn detached, as at a shutdown, and is forgotten), yet a ``follow`` replays
the pending ``approval_request`` and stays on through the continuation's
events to ``done`` — over the stream API, and over a websocket ``follow``
frame while another socket decides. (Against a live daphne restarted:
tests/test_follow_waiting_e2e.py.)"""

import asyncio
from types import SimpleNamespace

import pytest
from channels.testing import WebsocketCommunicator

from chat_app import approvals, streams
from chat_app.turns import registry, start_turn
from omni.asgi import application
from sessions_app import selectors, services
from sessions_app.errors import NotFound
from sessions_app.models import ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]

REQUEST_KEYS = ("type", "approvalId", "toolUseId", "tool", "input", "expiresAt", "turnId", "threadId")


@pytest.fixture
async def restartable(offline_chat, monkeypatch):
    offline_chat.OMNI_STREAM_LINGER_SECONDS = 0.0  # a detached turn is forgotten at once, as after a restart
    # The follower must be woken by the continuation's start, not find it by
    # looking again later: a look-again this slow would miss every deadline.
    monkeypatch.setattr(streams, "idle_seconds", lambda: 120.0)
    approvals.start_sweeper()  # as the server does at its start (chat_app.lifecycle.startup)
    yield offline_chat
    await approvals.stop_sweeper()


def body(message, thread, resource="tess", agent=None):
    return SimpleNamespace(message=message, threadId=thread, resourceId=resource, agent=agent)


async def events_of(turn):
    return [event async for event in turn.listen()]


def kinds(events):
    return [e["type"] for e in events if e["type"] not in ("chunk", "text")]


async def seed(thread, resource="tess"):
    events = await events_of(await start_turn(None, body("an old conversation", thread, resource, "datadog")))
    assert events[-1]["type"] == "done"


async def restarted_while_waiting(thread, target):
    """A turn whose call waits for a decision, then every process "restarted":
    the turn let go (as at shutdown) and this process forgot it."""
    turn = await start_turn(None, body(f'Delete it [tool delete_conversation {{"threadId": "{target}"}}]',
                                       thread))
    request = None
    async for event in turn.listen():
        if event["type"] == "approval_request":
            request = event
            break
    assert request is not None
    while not turn.waiting:
        await asyncio.sleep(0.02)
    turn.detach()
    events = await asyncio.wait_for(events_of(turn), 20)
    assert events[-1]["code"] == "turn_lost"
    while registry.by_id(turn.turn_id) is not None:
        await asyncio.sleep(0.02)
    assert registry.running() == []
    return turn, request


async def test_a_follow_after_a_restart_replays_the_request_and_streams_the_continuation(restartable):
    await seed("old")
    turn, request = await restarted_while_waiting("t-wait", "old")
    stream = await streams.follow("tess", "t-wait")
    events = aiter(stream)
    replayed = await asyncio.wait_for(anext(events), 10)
    assert {k: replayed[k] for k in REQUEST_KEYS} == {k: request[k] for k in REQUEST_KEYS}
    assert isinstance(replayed["seq"], int)
    rest = asyncio.create_task(asyncio.wait_for(_collect(events), 60))
    await asyncio.sleep(0.5)
    assert not rest.done()  # it stays on while the call waits
    await approvals.decide(None, SimpleNamespace(threadId="t-wait", resourceId="tess",
                                                 approvalId=request["approvalId"], decision="allow",
                                                 message=None))
    rest = await rest
    assert kinds(rest) == ["session", "approval", "tool_result", "done"], kinds(rest)
    continuation = rest[0]["turnId"]
    assert continuation != turn.turn_id and {e["turnId"] for e in rest} == {continuation}
    assert [e["seq"] for e in rest] == list(range(len(rest)))
    assert rest[1]["approvalId"] == request["approvalId"] and rest[1]["decision"] == "allow"
    assert await selectors.get_mapping("old", "tess") is None  # the call ran, once
    row = await ToolCall.objects.aget(approval_id=request["approvalId"])
    assert (row.status, row.continued_by) == ("done", continuation)
    with pytest.raises(NotFound):  # nothing waits any more
        await _follow_after_linger("t-wait")


async def _collect(events):
    return [event async for event in events]


async def _follow_after_linger(thread):
    while registry.get("tess", thread) is not None:
        await asyncio.sleep(0.02)
    return await streams.follow("tess", thread)


async def test_a_decided_call_not_yet_continued_is_followed_too(restartable):
    """Decided while no sweeper runs here: the follow still shows the request
    and then the turn the sweeper starts."""
    await seed("old2")
    turn, request = await restarted_while_waiting("t-decided", "old2")
    await approvals.stop_sweeper()
    call = await ToolCall.objects.aget(approval_id=request["approvalId"])
    from sessions_app import toolcalls as calls

    assert await calls.decide(call, "deny", "tess", "no")
    stream = await streams.follow("tess", "t-decided")
    events = aiter(stream)
    assert (await asyncio.wait_for(anext(events), 10))["approvalId"] == request["approvalId"]
    rest = asyncio.create_task(asyncio.wait_for(_collect(events), 60))
    started = await approvals.sweep()  # a worker's sweeper takes it up
    assert len(started) == 1
    rest = await rest
    assert kinds(rest) == ["session", "approval", "tool_result", "done"]
    assert rest[0]["turnId"] == started[0].turn_id and rest[1]["decision"] == "deny"
    assert await selectors.get_mapping("old2", "tess") is not None  # denied: never ran


async def test_a_websocket_follow_replays_the_request_and_another_socket_decides(restartable):
    await seed("old3")
    turn, request = await restarted_while_waiting("t-ws", "old3")
    follower = WebsocketCommunicator(application, "/ws/chat/")
    decider = WebsocketCommunicator(application, "/ws/chat/")
    assert (await follower.connect())[0] and (await decider.connect())[0]
    await follower.send_json_to({"type": "follow", "threadId": "t-ws", "resourceId": "tess"})
    replayed = await follower.receive_json_from(timeout=10)
    assert {k: replayed[k] for k in REQUEST_KEYS} == {k: request[k] for k in REQUEST_KEYS}
    # following again from the same socket streams nothing twice
    await follower.send_json_to({"type": "follow", "threadId": "t-ws", "resourceId": "tess"})
    assert await follower.receive_nothing(timeout=0.5)
    await decider.send_json_to({"type": "approval", "threadId": "t-ws", "resourceId": "tess",
                                "approvalId": request["approvalId"], "decision": "allow"})
    rest = []
    while not rest or rest[-1]["type"] not in ("done", "error"):
        rest.append(await follower.receive_json_from(timeout=30))
    assert kinds(rest) == ["session", "approval", "tool_result", "done"], kinds(rest)
    await follower.send_json_to({"type": "follow", "threadId": "t-ws", "resourceId": "tess"})
    again = await follower.receive_json_from(timeout=10)  # nothing waits or runs any more
    assert again["type"] == "error" and again["code"] == "not_found", again
    assert await decider.receive_nothing(timeout=0.2)
    await follower.disconnect()
    await decider.disconnect()


async def following_after_restart(thread, target):
    """A follower of ``thread``, whose call (to delete ``target``) waits after
    every process restarted, past the replayed ``approval_request``."""
    await seed(target)
    await restarted_while_waiting(thread, target)
    events = aiter(await streams.follow("tess", thread))
    assert (await asyncio.wait_for(anext(events), 10))["type"] == "approval_request"
    return events


async def test_a_follower_of_a_waiting_call_whose_thread_is_deleted_ends(restartable, monkeypatch):
    monkeypatch.setattr(streams, "idle_seconds", lambda: 0.2)  # a deletion wakes nobody: it looks again
    events = await following_after_restart("t-del", "old4")
    await services.delete_session("t-del", "tess")
    rest = await asyncio.wait_for(_collect(events), 10)
    assert [e["type"] for e in rest] == ["error"] and rest[0]["code"] == "not_found"


async def test_stop_after_a_restart_denies_the_waiting_call_and_the_follower_gets_the_rest(restartable):
    """As Stop denies the call a running turn waits for: with no turn left,
    an interrupt of the thread denies the waiting call; the conversation goes
    on (the sweeper) to the follower."""
    events = await following_after_restart("t-stop", "old5")
    await streams.interrupt("tess", "t-stop")
    rest = await asyncio.wait_for(_collect(events), 60)
    assert kinds(rest) == ["session", "approval", "tool_result", "done"], kinds(rest)
    assert (rest[1]["decision"], rest[1]["by"]) == ("deny", "interrupt")
    assert await selectors.get_mapping("old5", "tess") is not None  # never ran
    with pytest.raises(NotFound):  # nothing runs or waits any more
        await _follow_after_linger("t-stop")
    with pytest.raises(NotFound):
        await streams.interrupt("tess", "t-stop")
