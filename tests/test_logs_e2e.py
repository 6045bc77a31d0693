"""``OMNI_LOG_FORMAT=json`` on a live daphne server: its log is JSON line by
line, and a turn's lines carry the ids its client saw."""

from __future__ import annotations

import json

import pytest

from tests.e2e import new_id, serving

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    yield from serving(tmp_path_factory, extra_env={"OMNI_LOG_FORMAT": "json"})


def test_every_log_line_of_a_live_server_is_json_with_the_turns_ids(json_server):
    thread = new_id("jsonlog")
    first = json_server.chat("Remember the harbour", "rosa", thread).assert_ok()
    again = json_server.chat("What did I say?", "rosa", thread).assert_ok()
    json_server.wait_log(r"Resuming session: " + again.session_id)

    lines = json_lines(json_server)
    assert {"omni.chat", "daphne.server"} <= {line["logger"] for line in lines}, lines
    resumed = [line for line in lines if line["message"] == f"[CHAT] Resuming session: {again.session_id}"]
    assert len(resumed) == 1
    assert resumed[0]["turnId"] == again.last["turnId"]
    assert (resumed[0]["threadId"], resumed[0]["resourceId"]) == (thread, "rosa")
    saved = [line for line in lines if line["message"].startswith(f"[CHAT] Saved session mapping thread={thread} ")]
    assert {line["turnId"] for line in saved} == {first.last["turnId"], again.last["turnId"]}


def json_lines(server) -> list[dict]:
    """Every line the server wrote (stdout and stderr, merged), each parsed as JSON."""
    lines = []
    for number, raw in enumerate(server.log().splitlines(), 1):
        try:
            lines.append(json.loads(raw))
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {raw!r}") from None
        assert isinstance(lines[-1], dict), raw
    return lines


def test_daphnes_access_lines_are_json_too(json_server):
    thread = new_id("access")
    status, _ = json_server.get_json("/api/sessions", resourceId="rosa", threadId=thread)
    assert status == 200
    status, _ = json_server.get_json("/api/sessions/no-such-route")
    assert status == 404
    json_server.wait_log(r'"path": "/api/sessions/no-such-route"')

    access = [line for line in json_lines(json_server) if line["logger"] == "daphne.access"]
    ok = [line for line in access if line["path"] == f"/api/sessions?resourceId=rosa&threadId={thread}"]
    assert len(ok) == 1, access
    assert (ok[0]["method"], ok[0]["status"], ok[0]["client"].split(":")[0]) == ("GET", 200, "127.0.0.1")
    assert ok[0]["size"] > 0 and ok[0]["level"] == "INFO" and ok[0]["time"].endswith("Z")
    assert f"GET /api/sessions?resourceId=rosa&threadId={thread}" in ok[0]["message"]
    missing = [line for line in access if line["path"] == "/api/sessions/no-such-route"]
    assert [(line["method"], line["status"]) for line in missing] == [("GET", 404)]
