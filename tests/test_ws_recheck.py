"""An open websocket checks its caller's credential against the database at
every frame (contract §6: every frame that starts, queues or decides a turn),
not once per ``OMNI_WS_RECHECK_SECONDS``: a token revoked, a user made
inactive, a session logged out or a password changed between two frames
starts nothing more and decides nothing more (the socket closes with 4401,
the frame is not handled). Only forwarded events use the cached check.

The cache is set to a minute here, so every test would start (or decide)
what it must not if a frame were let through on the cached check."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from chat_app import sdk
from chat_app.models import ThreadLease, TurnStart
from chat_app.turns import registry
from omni.asgi import application
from sessions_app import tokens
from sessions_app.models import SessionMapping, ToolCall, TurnRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk, pytest.mark.engine_agnostic]


@pytest.fixture(autouse=True)
def auth_required(settings, offline_chat):
    settings.OMNI_AUTH = "required"
    settings.OMNI_WS_RECHECK_SECONDS = 60  # a frame must not rely on it
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@sync_to_async
def make_user(username, **fields):
    return get_user_model().objects.create_user(username, **fields)


@sync_to_async
def issue(username):
    return tokens.issue(username)[0]


async def open_socket(token=None, cookie=None):
    headers = [(b"cookie", cookie.encode())] if cookie else []
    path = f"/ws/chat/?token={token}" if token else "/ws/chat/"
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def until(comm, *kinds, timeout=30) -> list[dict]:
    events = []
    while not events or events[-1]["type"] not in kinds:
        events.append(await comm.receive_json_from(timeout=timeout))
    return events


async def closed_with(comm, frame, timeout=10) -> int:
    """Send ``frame``; the close code the socket answers with. Any event
    before the close fails the test: the frame was handled."""
    await comm.send_json_to(frame)
    output = await comm.receive_output(timeout=timeout)
    assert output["type"] == "websocket.close", output
    return output.get("code")


def model_heard(text: str) -> bool:
    """Whether any request the offline model got carries ``text``."""
    model = sdk._offline_model
    return model is not None and any(text in repr(body) for body in list(model.requests))


async def nothing_started(thread: str, text: str, starts: int) -> None:
    """No turn, lease, mapping or turn record for ``thread``, no turn start
    counted since there were ``starts``, and the model never heard ``text``
    (given the time a turn would take)."""
    await asyncio.sleep(1)  # a turn let through would have called the model by now
    assert [t for t in registry.running() if t.spec.thread_id == thread] == []
    assert not await SessionMapping.objects.filter(thread_id=thread).aexists()
    assert not await ThreadLease.objects.filter(thread_id=thread).aexists()
    assert await TurnStart.objects.acount() == starts
    assert not await TurnRecord.objects.filter(thread_id=thread).aexists()
    assert not model_heard(text)


async def first_turn(comm, thread: str) -> None:
    """A turn the socket starts while its caller is fine (the check passes)."""
    await comm.send_json_to({"type": "message", "message": "first words", "threadId": thread})
    events = await until(comm, "done", "error")
    assert events[-1]["type"] == "done", events[-1]
    assert model_heard("first words")


@pytest.mark.parametrize("kind", ["message", "fork"])
async def test_a_token_revoked_between_two_frames_starts_nothing(kind):
    await make_user("alice")
    comm = await open_socket(await issue("alice"))
    await first_turn(comm, "before")
    starts = await TurnStart.objects.acount()
    await sync_to_async(tokens.revoke)(username="alice")
    frame = {"type": "message", "message": "second words", "threadId": "after"}
    if kind == "fork":
        frame.update(type="fork", forkFromThreadId="before")
    assert await closed_with(comm, frame) == 4401
    await nothing_started("after", "second words", starts)
    assert await TurnRecord.objects.filter(thread_id="before").acount() == 1


async def test_a_token_revoked_while_a_call_waits_decides_nothing():
    await make_user("alice")
    comm = await open_socket(await issue("alice"))
    await comm.send_json_to({"type": "message", "threadId": "t-wait",
                             "message": 'Delete it [tool delete_conversation {"threadId": "keep"}]'})
    request = (await until(comm, "approval_request", "done", "error"))[-1]
    assert request["type"] == "approval_request", request
    turn = registry.get("alice", "t-wait")
    while not turn.waiting:
        await asyncio.sleep(0.02)
    await sync_to_async(tokens.revoke)(username="alice")
    assert await closed_with(comm, {"type": "approval", "threadId": "t-wait", "approvalId": request["approvalId"],
                                    "decision": "allow"}) == 4401
    await asyncio.sleep(1)  # a decision let through would have woken the turn by now
    call = await ToolCall.objects.aget(approval_id=request["approvalId"])
    assert (call.status, call.decision, call.decided_at) == ("pending", None, None)
    assert turn.waiting and not turn.finished
    # the call is still the caller's to decide, with a credential that holds
    comm = await open_socket(await issue("alice"))
    await comm.send_json_to({"type": "follow", "threadId": "t-wait", "turnId": turn.turn_id,
                             "afterSeq": request["seq"]})
    await comm.send_json_to({"type": "approval", "threadId": "t-wait", "approvalId": request["approvalId"],
                             "decision": "deny"})
    rest = await until(comm, "done", "error")
    assert rest[0]["type"] == "approval" and rest[0]["decision"] == "deny" and rest[-1]["type"] == "done"
    await comm.disconnect()


@pytest.mark.parametrize("change", ["logout", "inactive", "password"])
async def test_a_sessions_socket_starts_nothing_once_its_session_no_longer_holds(change):
    user = await make_user("alice", password="pw-alice-123")
    client = Client()
    await sync_to_async(client.force_login)(user)
    comm = await open_socket(cookie=f"sessionid={client.cookies['sessionid'].value}")
    await first_turn(comm, "before")
    starts = await TurnStart.objects.acount()
    if change == "logout":
        await sync_to_async(client.post)("/accounts/logout/")
    elif change == "inactive":
        user.is_active = False
        await user.asave()
    else:
        await sync_to_async(user.set_password)("another-pw-456")
        await user.asave()
    assert await closed_with(comm, {"type": "message", "message": "second words", "threadId": "after"}) == 4401
    await nothing_started("after", "second words", starts)


async def test_an_inactive_users_token_socket_starts_nothing():
    user = await make_user("alice")
    comm = await open_socket(await issue("alice"))
    await first_turn(comm, "before")
    starts = await TurnStart.objects.acount()
    user.is_active = False
    await user.asave()
    assert await closed_with(comm, {"type": "message", "message": "second words", "threadId": "after"}) == 4401
    await nothing_started("after", "second words", starts)


async def test_forwarded_events_use_the_cached_check_and_the_next_frame_does_not():
    """A follower whose token is revoked mid-turn still gets that turn's
    events within ``OMNI_WS_RECHECK_SECONDS`` (no query per event); its next
    frame is checked against the database and closes the socket."""
    await make_user("bob")
    owner = await open_socket(await issue("bob"))
    watcher = await open_socket(await issue("bob"))
    await owner.send_json_to({"type": "message", "message": "Count slowly [slow]", "threadId": "busy"})
    session = await owner.receive_json_from(timeout=30)
    assert session["type"] == "session"
    await watcher.send_json_to({"type": "follow", "threadId": "busy"})
    assert await watcher.receive_json_from(timeout=10) == session
    await sync_to_async(tokens.revoke)(username="bob")
    rest = await until(watcher, "done", "error")
    assert rest[-1]["type"] == "done" and any(e["type"] == "text" for e in rest)
    assert await closed_with(watcher, {"type": "follow", "threadId": "busy"}) == 4401
    await until(owner, "done", "error")
    await owner.disconnect()
