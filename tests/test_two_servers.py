"""Two live daphne servers sharing ONE database, each with a data dir of its
own (so its own ``CLAUDE_CONFIG_DIR``) and, in the module's pair, a CLI
working directory of its own (``OMNI_WORKSPACE_DIR`` set differently, as two
operators might): a conversation moves between them through the transcripts
in the database, and deleting it on one leaves no trace anywhere. With the
default working directory (the same path everywhere) nothing needs moving.

The database is an embedded libSQL file both servers open
(``DATABASE_URL=file:<tmp>/shared.db``) or, when the test run has
``DATABASE_URL=postgres://...``, one fresh PostgreSQL database on that server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e import (
    ROOT,
    Server,
    ServerPair,
    new_id,
    python_bin,
    reply,
    run_database,
    store_enabled,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not store_enabled(), reason="needs the transcript store (OMNI_SESSION_STORE)"),
]

ADOPTED = "[CHAT] Adopted stored session"


class PairServer(Server):
    """A :class:`~tests.e2e.Server` that does not inherit the test run's
    ``OMNI_WORKSPACE_DIR`` (unless given one)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        if "OMNI_WORKSPACE_DIR" not in self.extra_env:
            env.pop("OMNI_WORKSPACE_DIR", None)
        return env


class Pair(ServerPair):
    """Servers A and B on one shared database."""

    def __init__(self, tmp: Path, *, shared_workspace: bool):
        self.pg = run_database()
        self.database_url = self.pg.url if self.pg else f"file:{tmp / 'shared.db'}"
        # Warm clients off: these tests check that each turn's CLI exits
        # (tests/test_e2e_pool.py moves conversations with them on).
        extra = {"OMNI_WARM_CLIENTS": "0"}

        def own(name: str) -> dict[str, str]:  # the default's path, or one of its own
            return extra if shared_workspace else {**extra, "OMNI_WORKSPACE_DIR": str(tmp / name / "workspace")}

        self.a = PairServer(tmp / "server-a", self.database_url, own("server-a"))
        self.b = PairServer(tmp / "server-b", self.database_url, own("server-b"))


    def db_state(self, session_id: str) -> dict[str, int]:
        """Rows of ``session_id`` in the shared database, counted by the
        project itself (its own engine, the servers' settings)."""
        code = (
            "import json\n"
            "from sessions_app.models import SessionMapping, TranscriptEntry, TranscriptSummary\n"
            f"sid = {session_id!r}\n"
            "print(json.dumps({\n"
            "  'mappings': SessionMapping.objects.filter(session_id=sid).count(),\n"
            "  'lines': TranscriptEntry.objects.filter(session_id=sid).count(),\n"
            "  'summaries': TranscriptSummary.objects.filter(session_id=sid).count()}))\n"
        )
        done = subprocess.run([python_bin(), "manage.py", "shell", "-c", code], cwd=ROOT,
                              env=self.a.env(), capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def project_keys(self, session_id: str) -> set[str]:
        """The project keys ``session_id``'s transcript rows are stored under."""
        code = (
            "import json\n"
            "from sessions_app.models import TranscriptEntry\n"
            f"rows = TranscriptEntry.objects.filter(session_id={session_id!r})\n"
            "print(json.dumps(sorted(set(rows.values_list('project_key', flat=True)))))\n"
        )
        done = subprocess.run([python_bin(), "manage.py", "shell", "-c", code], cwd=ROOT,
                              env=self.a.env(), capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        return set(json.loads(done.stdout.strip().splitlines()[-1]))

    def project_dirs(self) -> set[str]:
        """The CLI project folders the servers' config dirs hold."""
        return {p.name for s in (self.a, self.b) for p in (s.claude_dir / "projects").glob("*")}


def start_pair(tmp: Path, shared_workspace: bool) -> Pair:
    pair = Pair(tmp, shared_workspace=shared_workspace)
    try:
        pair.start()
    except BaseException:
        pair.stop()
        raise
    return pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A and B with working directories of their own (configured so)."""
    pair = start_pair(tmp_path_factory.mktemp("two-servers"), shared_workspace=False)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(autouse=True)
def no_cli_left(request):
    yield
    if "pair" in request.fixturenames:
        pair = request.getfixturevalue("pair")
        for server in (pair.a, pair.b):
            assert server.wait_no_cli(timeout=15) == [], "a CLI process outlived its turn"


def assert_turn(result, *, thread_id, resumed: bool):
    result.assert_ok()
    session = result.session
    assert session["threadId"] == thread_id
    assert session["resumed"] is resumed, session
    assert "notice" not in session, session
    assert all(e.get("sessionId") == session["sessionId"] for e in result.events[1:])
    return session


@pytest.fixture(scope="module")
def moved(pair):
    """One thread: turn 1 on A, turn 2 on B, turn 3 on A again."""
    resource, thread = new_id("user"), new_id("thread")
    one = pair.a.chat("What is 2+2?", resource, thread)
    two = pair.b.chat("What was my last question?", resource, thread)
    three = pair.a.chat("And what did I ask first?", resource, thread)
    return {"resource": resource, "thread": thread, "turns": (one, two, three),
            "a_log": pair.a.log(), "b_log": pair.b.log()}


def test_the_servers_have_their_own_working_directories(pair, moved):
    from claude_agent_sdk import project_key_for_directory

    one = moved["turns"][0]
    assert_turn(one, thread_id=moved["thread"], resumed=False)
    assert pair.a.claude_dir != pair.b.claude_dir
    key_a, key_b = (project_key_for_directory(str(s.data_dir / "workspace")) for s in pair)
    assert key_a != key_b
    # B took the session over into its own CLI project, A took it back
    assert f"{ADOPTED} {one.session_id} into project {key_b}" in moved["b_log"]
    assert f"{ADOPTED} {one.session_id} into project {key_a}" in moved["a_log"]


def test_a_conversation_started_on_a_resumes_on_b(pair, moved):
    one, two, _ = moved["turns"]
    session = assert_turn(two, thread_id=moved["thread"], resumed=True)
    assert session["sessionId"] == one.session_id
    assert 'Earlier questions: "What is 2+2?"' in two.text
    assert two.text == reply("What was my last question?", "What is 2+2?")
    assert f"[CHAT] Resuming session: {one.session_id}" in moved["b_log"], moved["b_log"][-3000:]
    # B never saw the session: it came from the database, moved to B's project
    assert ADOPTED in moved["b_log"]


def test_back_on_a_the_third_turn_sees_both_questions(pair, moved):
    one, _, three = moved["turns"]
    session = assert_turn(three, thread_id=moved["thread"], resumed=True)
    assert session["sessionId"] == one.session_id
    assert three.text == reply("And what did I ask first?", "What is 2+2?",
                               "What was my last question?")
    assert f"[CHAT] Resuming session: {one.session_id}" in moved["a_log"]
    # B wrote the second turn last: A takes the session back from the database
    # rather than resuming the stale local file its first turn left
    assert ADOPTED in moved["a_log"], moved["a_log"][-3000:]


def test_b_lists_every_message(pair, moved):
    one, two, three = moved["turns"]
    status, data = pair.b.get_json("/api/sessions/messages", threadId=moved["thread"],
                                   resourceId=moved["resource"])
    assert status == 200, data
    assert data["threadId"] == moved["thread"] and data["sessionId"] == one.session_id
    assert [(m["role"], m["text"]) for m in data["messages"]] == [
        ("user", "What is 2+2?"), ("assistant", one.text),
        ("user", "What was my last question?"), ("assistant", two.text),
        ("user", "And what did I ask first?"), ("assistant", three.text),
    ]
    # A answers the same from the same database
    status, same = pair.a.get_json("/api/sessions/messages", threadId=moved["thread"],
                                   resourceId=moved["resource"])
    assert status == 200 and same == data
    status, meta = pair.b.metadata(moved["thread"], moved["resource"])
    assert status == 200 and meta["session"]["messageCount"] == 6


@pytest.fixture(scope="module")
def deleted(pair, moved):
    """The thread of ``moved``, deleted on B."""
    sid = moved["turns"][0].session_id
    before = pair.db_state(sid)
    status, _, body = pair.b.request(
        "DELETE", "/api/sessions", {"threadId": moved["thread"], "resourceId": moved["resource"]})
    return {"sid": sid, "before": before, "status": status, "body": body}


def test_deleting_on_b_leaves_no_trace_in_the_database(pair, moved, deleted):
    sid = deleted["sid"]
    before = deleted["before"]
    assert before["mappings"] == 1 and before["lines"] > 0 and before["summaries"] > 0, before
    assert deleted["status"] == 200, deleted["body"]
    assert deleted["body"] == {"success": True, "threadId": moved["thread"],
                               "resourceId": moved["resource"]}
    assert pair.db_state(sid) == {"mappings": 0, "lines": 0, "summaries": 0}
    assert pair.b.local_transcripts(sid) == [], "B's own local files are erased"
    # both servers agree the thread is gone
    for server in (pair.a, pair.b):
        status, data = server.metadata(moved["thread"], moved["resource"])
        assert status == 404, data
        status, data = server.get_json("/api/sessions/messages", threadId=moved["thread"],
                                       resourceId=moved["resource"])
        assert status == 404, data


def test_deleting_on_b_leaves_no_local_transcript_on_a(pair, deleted):
    assert pair.a.local_transcripts(deleted["sid"]) == [], (
        "server A still holds the CLI's transcript of the deleted session")


def test_after_the_delete_the_thread_starts_afresh(pair, moved, deleted):
    again = pair.a.chat("Fresh start?", moved["resource"], moved["thread"])
    session = assert_turn(again, thread_id=moved["thread"], resumed=False)
    assert session["sessionId"] != deleted["sid"]
    assert again.text == reply("Fresh start?")


def test_a_fork_reads_its_parent_where_it_is_and_never_moves_it(pair):
    """A fork on B of a thread whose turn runs on A at that moment (A and B
    have working directories of their own, so projects of their own): the
    fork reads the parent from A's project; the parent's rows stay there,
    so its running turn and its later turns on A keep the whole context.
    The fork copies the parent as stored at that moment: with the message of
    the turn running on A (stored as that turn started), not its reply."""
    resource, parent, child = new_id("user"), new_id("thread"), new_id("fork")
    first = pair.a.chat("What is 2+2?", resource, parent)
    assert_turn(first, thread_id=parent, resumed=False)
    before = pair.project_keys(first.session_id)
    running = pair.a.open_sse("/api/chat", {"message": "Count slowly [slow]", "resourceId": resource,
                                            "threadId": parent})
    running.read_until("text")  # the parent's turn is under way on A
    fork = pair.b.fork("Now multiply", resource, parent, child)
    assert_turn(fork, thread_id=child, resumed=False)
    assert fork.text == reply("Now multiply", "What is 2+2?", "Count slowly [slow]")
    assert_turn(running.result(), thread_id=parent, resumed=True)
    running.close()
    assert pair.project_keys(first.session_id) == before  # one project: A's, as before
    third = pair.a.chat("And before that?", resource, parent)
    assert_turn(third, thread_id=parent, resumed=True)
    assert third.text == reply("And before that?", "What is 2+2?", "Count slowly [slow]")
    # the fork's own conversation is B's, complete
    again = pair.b.chat("What did I ask?", resource, child)
    assert again.text == reply("What did I ask?", "What is 2+2?", "Count slowly [slow]", "Now multiply")


def test_a_shared_workspace_needs_no_adoption(tmp_path):
    """The default ``OMNI_WORKSPACE_DIR``, the same path on both servers: one
    CLI project, so B resumes A's session straight from the database."""
    shared = start_pair(tmp_path, shared_workspace=True)
    try:
        resource, thread = new_id("user"), new_id("thread")
        one = shared.a.chat("What is 2+2?", resource, thread)
        assert_turn(one, thread_id=thread, resumed=False)
        two = shared.b.chat("What was my last question?", resource, thread)
        session = assert_turn(two, thread_id=thread, resumed=True)
        assert session["sessionId"] == one.session_id
        assert two.text == reply("What was my last question?", "What is 2+2?")
        b_log = shared.b.log()
        assert f"[CHAT] Resuming session: {one.session_id}" in b_log
        assert ADOPTED not in b_log, b_log[-3000:]
        assert len(shared.project_dirs()) <= 1, shared.project_dirs()
        for server in (shared.a, shared.b):
            assert server.wait_no_cli(timeout=15) == []
    finally:
        shared.stop()
