"""An open websocket keeps only the rights its caller still has (issue 15,
items 5 and 9): the caller is checked again while the socket is open (at
every frame; on forwarded events at most every ``OMNI_WS_RECHECK_SECONDS``),
so a revoked token, an inactive
user or a logged-out session closes the socket with 4401 at its next frame
(the frame is not handled), and a caller that lost the cross-resource
permission is refused other resources and gets no more of their turns'
events. Cross-resource access needs the project's permission
(``sessions_app.access_all_resources``), not the staff flag."""


import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.test import Client

from chat_app.turns import registry
from omni.asgi import application
from sessions_app import services, tokens
from sessions_app.models import SessionMapping

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]


@pytest.fixture(autouse=True)
def auth_required(settings):
    settings.OMNI_AUTH = "required"
    settings.OMNI_WS_RECHECK_SECONDS = 0  # every frame checks again (the cache has a test of its own)


@sync_to_async
def make_user(username, *, perm=False, group=False, **fields):
    user = get_user_model().objects.create_user(username, **fields)
    if perm or group:
        permission = Permission.objects.get(codename="access_all_resources")
        if group:
            team = Group.objects.create(name=f"{username}-team")
            team.permissions.add(permission)
            user.groups.add(team)
        else:
            user.user_permissions.add(permission)
    return user


@sync_to_async
def issue(username):
    return tokens.issue(username)[0]


async def open_socket(token=None, cookie=None):
    headers = []
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    path = f"/ws/chat/?token={token}" if token else "/ws/chat/"
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def answer(comm, frame):
    await comm.send_json_to(frame)
    return await comm.receive_json_from(timeout=10)


async def closed_with(comm, frame=None, timeout=10) -> int:
    """Send ``frame`` (if any); the close code the socket answers with (any
    events before the close are skipped)."""
    if frame is not None:
        await comm.send_json_to(frame)
    while True:
        output = await comm.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            return output.get("code")


FOLLOW_OWN = {"type": "follow", "threadId": "nothing-runs"}


# --- item 9: the permission, not the staff flag -----------------------------------------


async def test_a_staff_user_without_the_permission_is_refused_other_resources():
    await make_user("ops", is_staff=True)
    await services.save_session("t2", "bob", "s-bob-t2", user_message="hi")
    comm = await open_socket(await issue("ops"))
    for frame in (
        {"type": "follow", "threadId": "t2", "resourceId": "bob"},
        {"type": "message", "message": "hi", "threadId": "t2", "resourceId": "bob"},
        {"type": "fork", "message": "hi", "forkFromThreadId": "t2", "threadId": "f", "resourceId": "bob"},
        {"type": "interrupt", "threadId": "t2", "resourceId": "bob"},
    ):
        assert (await answer(comm, frame))["code"] == "forbidden", frame
    assert await SessionMapping.objects.acount() == 1
    await comm.disconnect()


@pytest.mark.parametrize("how", ["perm", "group"])
async def test_the_permission_opens_other_resources(how):
    await make_user("ops", **{how: True})
    comm = await open_socket(await issue("ops"))
    event = await answer(comm, {"type": "follow", "threadId": "t2", "resourceId": "bob"})
    assert event["code"] == "not_found"  # allowed: no turn runs there
    await comm.disconnect()


# --- item 5: rights taken away while the socket is open ----------------------------------


async def test_a_revoked_token_closes_the_socket_and_starts_nothing():
    await make_user("alice")
    token = await issue("alice")
    comm = await open_socket(token)
    assert (await answer(comm, FOLLOW_OWN))["code"] == "not_found"  # works
    await sync_to_async(tokens.revoke)(username="alice")
    code = await closed_with(comm, {"type": "message", "message": "hi", "threadId": "after-revoke"})
    assert code == 4401
    assert registry.running() == []
    assert not await SessionMapping.objects.filter(thread_id="after-revoke").aexists()


async def test_an_inactive_users_socket_is_closed():
    user = await make_user("alice")
    comm = await open_socket(await issue("alice"))
    assert (await answer(comm, FOLLOW_OWN))["code"] == "not_found"
    user.is_active = False
    await user.asave()
    assert await closed_with(comm, FOLLOW_OWN) == 4401


async def test_a_logged_out_sessions_socket_is_closed():
    client = Client()
    await sync_to_async(client.force_login)(await make_user("alice", password="pw-alice-123"))
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    comm = await open_socket(cookie=cookie)
    assert (await answer(comm, FOLLOW_OWN))["code"] == "not_found"
    await sync_to_async(client.post)("/accounts/logout/")
    assert await closed_with(comm, FOLLOW_OWN) == 4401
    # and a fresh handshake with that cookie is refused
    refused = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"cookie", cookie.encode())])
    assert (await refused.connect())[0] is False


async def test_a_socket_that_lost_the_permission_is_refused_other_resources():
    ops = await make_user("ops", perm=True)
    comm = await open_socket(await issue("ops"))
    bob = {"type": "follow", "threadId": "t2", "resourceId": "bob"}
    assert (await answer(comm, bob))["code"] == "not_found"
    await ops.user_permissions.aclear()
    assert (await answer(comm, bob))["code"] == "forbidden"
    assert (await answer(comm, FOLLOW_OWN))["code"] == "not_found"  # its own: still open
    await comm.disconnect()


async def test_a_frame_is_checked_even_within_omni_ws_recheck_seconds(settings):
    # the cache is for forwarded events only (tests/test_ws_recheck.py)
    settings.OMNI_WS_RECHECK_SECONDS = 60
    await make_user("alice")
    comm = await open_socket(await issue("alice"))
    assert (await answer(comm, FOLLOW_OWN))["code"] == "not_found"
    await sync_to_async(tokens.revoke)(username="alice")
    assert await closed_with(comm, FOLLOW_OWN) == 4401


# --- forwarding stops; the turn runs on ------------------------------------------------


@pytest.mark.sdk
@pytest.mark.parametrize("taken", ["permission", "token"])
async def test_a_followed_turn_stops_reaching_a_socket_that_lost_its_rights(offline_chat, taken):
    ops = await make_user("ops", perm=True)
    await make_user("bob")
    owner = await open_socket(await issue("bob"))
    watcher = await open_socket(await issue("ops"))
    await owner.send_json_to({"type": "message", "message": "Count slowly [slow]", "threadId": "busy"})
    session = await owner.receive_json_from(timeout=30)
    assert session["type"] == "session"
    await watcher.send_json_to({"type": "follow", "threadId": "busy", "resourceId": "bob"})
    assert (await watcher.receive_json_from(timeout=10)) == session
    while (await watcher.receive_json_from(timeout=10))["type"] != "text":
        pass  # it follows the live turn
    if taken == "permission":
        await ops.user_permissions.aclear()
        while (event := await watcher.receive_json_from(timeout=10))["type"] == "text":
            pass  # events already on their way
        assert event["type"] == "error" and event["code"] == "forbidden", event
        assert event["threadId"] == "busy"
    else:
        await sync_to_async(tokens.revoke)(username="ops")
        assert await closed_with(watcher) == 4401
    # the turn itself runs to its end for its owner
    events = []
    while (event := await owner.receive_json_from(timeout=30))["type"] not in ("done", "error"):
        events.append(event)
    assert event["type"] == "done" and event["result"]["isError"] is False
    if taken == "permission":
        assert await watcher.receive_nothing(timeout=0.5)  # nothing more of bob's turn
        await watcher.disconnect()
    await owner.disconnect()
