"""Security and faults against a live daphne server with ``OMNI_AUTH=required``
(the service's default): tokens on every transport, a CLI with none of the
server's secrets, a CLI killed mid-turn, and the server killed (SIGKILL)
mid-turn: its CLI dies with it and the thread carries on after a restart."""

import os
import signal
import time

import aiohttp
import pytest

from tests.e2e import (
    WSClient,
    is_cli,
    issue_token,
    serving,
    new_id,
    processes_with_env,
    reply,
)
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]

SECRET_KEY = "e2e-django-secret-key-that-no-cli-may-see"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a long lease: a server killed mid-turn and restarted must not wait it out
    yield from serving(tmp_path_factory, extra_env={
        "OMNI_AUTH": "required", "OMNI_SECRET_KEY": SECRET_KEY, "OMNI_LEASE_SECONDS": "120"})


@pytest.fixture(scope="module")
def token(server):
    return issue_token(server, "erin")


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def sse(server, token, body, path="/api/chat"):
    with server.open_sse(path, body, headers=auth(token)) as stream:
        return stream.result()


def environ_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def test_tokens_on_http_and_sse(server, token):
    thread = new_id("thread")
    status, _, body = server.request("GET", "/api/sessions")
    assert status == 401 and body["error"]["code"] == "not_authenticated"
    status, _, body = server.request("GET", "/api/sessions", headers=auth("omni_wrong"))
    assert status == 401 and set(body["error"]) == {"code", "message"}
    result = sse(server, token, {"message": "Hello with a token", "threadId": thread}).assert_ok()
    assert result.session["resourceId"] == "erin"
    status, _, body = server.request("GET", "/api/sessions", headers=auth(token))
    assert status == 200 and [s["threadId"] for s in body["sessions"]] == [thread]
    # another resource: 403, and not revealed by naming its thread under one's own
    other = issue_token(server, "frank")
    status, _, body = server.request("GET", "/api/sessions?resourceId=erin", headers=auth(other))
    assert status == 403
    result = sse(server, other, {"message": "mine now", "forkFromThreadId": thread,
                                 "threadId": new_id("fork")}, path="/api/chat/fork")
    assert result.status == 404 and result.body["error"]["code"] == "not_found"


async def test_tokens_on_websockets(server, token):
    thread = new_id("thread")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(server.ws_url())  # no credentials
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(server.ws_url() + "?token=omni_wrong")
    for suffix, headers in ((f"?token={token}", {}), ("", auth(token))):
        session = aiohttp.ClientSession()
        client = WSClient(session, await session.ws_connect(server.ws_url() + suffix, headers=headers))
        async with client:
            result = await client.turn({"type": "message", "message": "over a socket", "threadId": thread})
            assert result.last["type"] == "done", result.describe()
            assert result.session["resourceId"] == "erin"
            await client.send({"type": "follow", "threadId": thread, "resourceId": "frank"})
            event = await client.recv()
            assert event["type"] == "error" and event["code"] == "forbidden"


async def test_websocket_origin_is_the_pages_own(server, token):
    """Issue 15, item 6: scheme, host and port of the Origin must be the
    page's own (the Host the socket came to): another port or scheme of the
    same host is refused, even with good credentials."""
    url = server.ws_url() + f"?token={token}"
    own = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        for origin in ("http://127.0.0.1:1", f"https://127.0.0.1:{server.port}",
                       f"http://localhost:{server.port}"):
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(url, origin=origin)
        async with http.ws_connect(url, origin=own) as ws:
            await ws.send_json({"type": "follow", "threadId": "nothing-runs"})
            assert (await ws.receive_json(timeout=10))["code"] == "not_found"


def test_a_live_cli_has_none_of_the_servers_secrets(server, token):
    thread = new_id("thread")
    stream = server.open_sse("/api/chat", {"message": "[slow] secrets?", "threadId": thread},
                             headers=auth(token))
    with stream:
        stream.read_until("text")
        clis = server.cli_children()
        assert clis, "the turn's CLI is running"
        for pid in clis:
            env = environ_of(pid)
            assert SECRET_KEY.encode() not in env
            assert token.encode() not in env
            names = {item.split(b"=", 1)[0] for item in env.split(b"\0") if item}
            assert not {b"OMNI_SECRET_KEY", b"DATABASE_URL", b"REDIS_URL", b"OMNI_AUTH"} & names
            assert b"CLAUDE_CONFIG_DIR" in names and b"ANTHROPIC_BASE_URL" in names
        assert stream.result().events[-1]["type"] == "done"


def test_the_cli_killed_mid_turn(server, token):
    """An error event; the mapping points at the session; the next turn works
    and remembers the question whose answer was cut off."""
    thread = new_id("thread")
    message = "[slow] a reply that will be cut off"
    stream = server.open_sse("/api/chat", {"message": message, "threadId": thread},
                             headers=auth(token))
    with stream:
        session = stream.read_until("session")
        stream.read_until("text")
        for pid in server.cli_children():
            os.kill(pid, signal.SIGKILL)
        events = stream.result().events
    assert events[-1]["type"] == "error", [e["type"] for e in events]
    assert set(events[-1]) >= {"type", "code", "message"}
    assert server.wait_no_cli(timeout=10) == []
    status, _, meta = server.request("POST", "/api/sessions/metadata", {"threadId": thread},
                                     headers=auth(token))
    assert status == 200 and meta["session"]["sessionId"] == session["sessionId"]
    after = sse(server, token, {"message": "Still there?", "threadId": thread}).assert_ok()
    assert after.session["resumed"] is True
    assert after.text == reply("Still there?", message)


def test_the_server_killed_mid_turn_takes_its_cli_along(server, token):
    """SIGKILL: no shutdown hook runs, yet the CLI dies with the server (a
    parent-death signal); after a restart the thread lists, its next turn
    starts at once (the dead server's lease is recognised as dead) and
    remembers the message sent before the crash."""
    thread = new_id("thread")
    message = "[slow] interrupted by a crash"
    stream = server.open_sse("/api/chat", {"message": message, "threadId": thread},
                             headers=auth(token))
    try:
        session = stream.read_until("session")
        stream.read_until("text")
        clis = server.cli_children()
        assert clis and all(is_cli(p) for p in clis)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        started = time.monotonic()
        wait_for(lambda: not [p for p in clis if is_cli(p)], 10, message="the CLI to die with its server")
        died_in = time.monotonic() - started
        assert processes_with_env("CLAUDE_CONFIG_DIR", str(server.claude_dir)) == []
    finally:
        stream.close()
        server.proc = None
    assert died_in < 3
    server.start()
    status, _, body = server.request("GET", "/api/sessions", headers=auth(token))
    assert thread in [s["threadId"] for s in body["sessions"]]
    # The killed server's lease (120 s) names a process of this host that is
    # gone: the restarted server takes the thread at once.
    after = sse(server, token, {"message": "What did I ask?", "threadId": thread})
    after.assert_ok()
    assert after.session["resumed"] is True and after.session["sessionId"] == session["sessionId"]
    assert after.text == reply("What did I ask?", message)
