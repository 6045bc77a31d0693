"""The websocket consumer through ``channels.testing``, real SDK and CLI."""

import asyncio

import pytest
from channels.testing import WebsocketCommunicator

from chat_app.turns import registry
from omni.asgi import application
from sessions_app import selectors

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk, pytest.mark.engine_agnostic]


async def connect(path="/ws/chat/", headers=None):
    comm = WebsocketCommunicator(application, path, headers=headers or [])
    connected, _ = await comm.connect()
    assert connected
    return comm


async def until_end(comm, timeout=30):
    """Events up to and including the turn's ``done`` or ``error``."""
    out = []
    while True:
        event = await comm.receive_json_from(timeout=timeout)
        out.append(event)
        if event["type"] in ("done", "error"):
            return out


def reply_text(events):
    return "".join(e["text"] for e in events if e["type"] == "text")


async def test_turns_resume_on_one_connection(offline_chat):
    comm = await connect()
    await comm.send_json_to(
        {"type": "message", "message": "What is 2+2?", "threadId": "ws-1", "resourceId": "alice"}
    )
    first = await until_end(comm)
    assert first[0]["type"] == "session"
    assert first[0]["resumed"] is False and first[0]["threadId"] == "ws-1"
    assert first[-1]["type"] == "done" and first[-1]["result"]["isError"] is False
    assert reply_text(first) == 'Offline model heard: "What is 2+2?". Earlier questions: none.'
    kinds = [e["chunk"]["kind"] for e in first if e["type"] == "chunk"]
    assert kinds[0] == "SystemMessage" and "AssistantMessage" in kinds and kinds[-1] == "ResultMessage"
    init = next(e["chunk"] for e in first if e["type"] == "chunk" and e["chunk"].get("subtype") == "init")
    # the default agent has no tool that touches the server: only its preset's own MCP tools
    assert sorted(init["data"]["tools"]) == [
        "mcp__omni__delete_conversation", "mcp__omni__read_conversation", "mcp__omni__search_conversations"]

    await comm.send_json_to(
        {"type": "message", "message": "What was my last question?", "threadId": "ws-1",
         "resourceId": "alice"}
    )
    second = await until_end(comm)
    assert second[0]["resumed"] is True
    assert second[0]["sessionId"] == first[0]["sessionId"]
    assert 'Earlier questions: "What is 2+2?"' in reply_text(second)
    mapping = await selectors.get_metadata("ws-1", "alice")
    assert mapping.message_count == 4 and mapping.title == "What is 2+2?"
    await comm.disconnect()


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "bad_request"),
        ('["a", "list"]', "bad_request"),
        ('{"type": "dance"}', "bad_request"),
        ('{"type": "message", "resourceId": "alice"}', "bad_request"),
        ('{"type": "message", "message": 5, "resourceId": "alice"}', "bad_request"),
        ('{"type": "message", "message": "hi", "resourceId": "bad id"}', "bad_request"),
        ('{"type": "message", "message": "hi", "resourceId": "alice", "agent": "nope"}',
         "unknown_agent"),
        ('{"type": "message", "message": "hi"}', "bad_request"),
        ('{"type": "interrupt", "threadId": "idle", "resourceId": "alice"}', "not_found"),
        ('{"type": "follow", "threadId": "idle", "resourceId": "alice"}', "not_found"),
        ('{"type": "fork", "message": "hi", "forkFromThreadId": "nope", "threadId": "f",'
         ' "resourceId": "alice"}', "not_found"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_open(offline_chat, frame, code):
    comm = await connect()
    await comm.send_to(text_data=frame)
    event = await comm.receive_json_from(timeout=10)
    assert event["type"] == "error" and event["code"] == code and event["message"]
    await comm.send_to(text_data='{"type": "follow", "threadId": "idle", "resourceId": "alice"}')
    assert (await comm.receive_json_from(timeout=10))["code"] == "not_found"
    await comm.disconnect()


async def test_message_too_long(offline_chat):
    comm = await connect()
    await comm.send_json_to({"type": "message", "message": "x" * 100_001, "resourceId": "alice"})
    event = await comm.receive_json_from(timeout=10)
    assert event["code"] == "message_too_large"
    await comm.disconnect()


async def test_busy_thread_interrupt_and_follow(offline_chat):
    comm = await connect()
    watcher = await connect()
    await comm.send_json_to(
        {"type": "message", "message": "Count slowly [slow]", "threadId": "busy", "resourceId": "bob"}
    )
    session = await comm.receive_json_from(timeout=30)
    assert session["type"] == "session"

    # A second turn on the same thread while the first runs: thread_busy.
    await watcher.send_json_to(
        {"type": "message", "message": "me too", "threadId": "busy", "resourceId": "bob"}
    )
    assert (await watcher.receive_json_from(timeout=10))["code"] == "thread_busy"

    # follow: the running turn's events, the missed ones first.
    await watcher.send_json_to({"type": "follow", "threadId": "busy", "resourceId": "bob"})
    assert (await watcher.receive_json_from(timeout=10)) == session

    loop = asyncio.get_running_loop()
    started = loop.time()
    await comm.send_json_to({"type": "interrupt", "threadId": "busy"})
    rest = await until_end(comm)
    assert loop.time() - started < 2.5  # the slow reply alone takes 3 s; expected under 0.8 s
    assert rest[-1]["type"] == "done" and rest[-1]["result"]["isError"] is True
    followed = await until_end(watcher)
    assert followed[-1] == rest[-1]
    assert registry.get("bob", "busy") is None
    mapping = await selectors.get_metadata("busy", "bob")
    assert mapping.session_id == session["sessionId"]
    await comm.disconnect()
    await watcher.disconnect()


async def test_fork_over_websocket(offline_chat):
    comm = await connect()
    await comm.send_json_to(
        {"type": "message", "message": "First question", "threadId": "parent", "resourceId": "carol"}
    )
    parent = await until_end(comm)
    await comm.send_json_to(
        {"type": "fork", "message": "Branch question", "forkFromThreadId": "parent",
         "threadId": "child", "resourceId": "carol"}
    )
    child = await until_end(comm)
    assert child[0]["forkedFromThreadId"] == "parent"
    assert child[0]["sessionId"] != parent[0]["sessionId"]
    assert 'Earlier questions: "First question"' in reply_text(child)

    await comm.send_json_to(
        {"type": "fork", "message": "again", "forkFromThreadId": "parent", "threadId": "child",
         "resourceId": "carol"}
    )
    assert (await comm.receive_json_from(timeout=10))["code"] == "thread_exists"
    await comm.disconnect()


async def test_auth_required_refuses_anonymous_handshake(offline_chat):
    offline_chat.OMNI_AUTH = "required"
    comm = WebsocketCommunicator(application, "/ws/chat/")
    connected, _ = await comm.connect()
    assert not connected


async def test_foreign_origin_is_refused(offline_chat):
    comm = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://evil.example")])
    connected, _ = await comm.connect()
    assert not connected
    ok = await connect(headers=[(b"host", b"localhost"), (b"origin", b"http://localhost")])
    await ok.disconnect()


async def test_a_client_that_reads_no_chunks_gets_none(offline_chat):
    """"chunks": false leaves out the chunk events; the rest is unchanged."""
    comm = await connect()
    try:
        await comm.send_json_to({"type": "message", "message": "Lean please", "threadId": "lean",
                                 "resourceId": "alice", "chunks": False})
        lean = await until_end(comm)
        await comm.send_json_to({"type": "message", "message": "Lean please", "threadId": "full",
                                 "resourceId": "alice"})
        full = await until_end(comm)
    finally:
        await comm.disconnect()
    assert "chunk" not in {e["type"] for e in lean} and "chunk" in {e["type"] for e in full}
    assert [e["type"] for e in lean] == [e["type"] for e in full if e["type"] != "chunk"]
    assert [e["seq"] for e in lean] == list(range(len(lean)))
    assert reply_text(lean) == reply_text(full)
    bad = await connect()
    try:
        await bad.send_json_to({"type": "message", "message": "x", "threadId": "lean", "resourceId": "alice",
                                "chunks": "no"})
        assert (await bad.receive_json_from(timeout=5))["code"] == "bad_request"
    finally:
        await bad.disconnect()
