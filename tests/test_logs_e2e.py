"""``OMNI_LOG_FORMAT=json`` on a live daphne server: its log is JSON line by
line, and a turn's lines carry the ids its client saw."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e import new_id, serving

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]
# daphne's access log: not a log record, written to stdout (the test merges
# stdout and stderr; the log records go to stderr)
ACCESS = re.compile(r'^\S+ - - \[[^\]]+\] "[A-Z]+ \S+" \d{3} \d+$')


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    yield from serving(tmp_path_factory, extra_env={"OMNI_LOG_FORMAT": "json"})


def test_every_log_line_of_a_live_server_is_json_with_the_turns_ids(json_server):
    thread = new_id("jsonlog")
    first = json_server.chat("Remember the harbour", "rosa", thread).assert_ok()
    again = json_server.chat("What did I say?", "rosa", thread).assert_ok()
    json_server.wait_log(r"Resuming session: " + again.session_id)

    lines = []
    for raw in json_server.log().splitlines():
        if raw.strip() and not ACCESS.match(raw):
            lines.append(json.loads(raw))  # every record, daphne's and Django's included
    assert {"omni.chat", "daphne.server"} <= {line["logger"] for line in lines}, lines
    resumed = [line for line in lines if line["message"] == f"[CHAT] Resuming session: {again.session_id}"]
    assert len(resumed) == 1
    assert resumed[0]["turnId"] == again.last["turnId"]
    assert (resumed[0]["threadId"], resumed[0]["resourceId"]) == (thread, "rosa")
    saved = [line for line in lines if line["message"].startswith(f"[CHAT] Saved session mapping thread={thread} ")]
    assert {line["turnId"] for line in saved} == {first.last["turnId"], again.last["turnId"]}
