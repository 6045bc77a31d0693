"""``manage.py import_local_sessions``: local CLI transcripts into the store.

Runs on the embedded libSQL file (default) and on PostgreSQL (``DATABASE_URL``).
"""

import json
import os
import uuid as uuidlib
from io import StringIO

import pytest
from asgiref.sync import async_to_sync
from django.core.management import CommandError, call_command

from sessions_app.models import TranscriptEntry
from sessions_app.transcripts import DjangoSessionStore, session_messages
from tests.sdk_helpers import ask, sdk_options

pytestmark = pytest.mark.django_db(transaction=True)

PROJECT = "-srv-omni-workspace"


def run(*args):
    out, err = StringIO(), StringIO()
    call_command("import_local_sessions", *args, stdout=out, stderr=err)
    return out.getvalue().strip().splitlines()[-1]


def load(session_id, subpath=None, project_key=PROJECT):
    key = {"project_key": project_key, "session_id": session_id}
    if subpath:
        key["subpath"] = subpath
    return async_to_sync(DjangoSessionStore().load)(key)


def write_jsonl(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


def lines(session_id, n, start=0):
    out = []
    for i in range(start, start + n):
        out.append({"type": "user" if i % 2 == 0 else "assistant", "uuid": f"{session_id[:8]}-{i}",
                    "sessionId": session_id, "n": i,
                    "message": {"role": "user", "content": f"question {i}"}
                    if i % 2 == 0 else {"id": f"m{i}", "role": "assistant",
                                        "content": [{"type": "text", "text": f"answer {i}"}]}})
    return out


@pytest.fixture
def config_dir(tmp_path):
    return tmp_path / "claude"


def test_imports_sessions_subagents_and_is_idempotent(config_dir):
    sid = str(uuidlib.uuid4())
    project = config_dir / "projects" / PROJECT
    main = [{"type": "queue-operation", "operation": "enqueue", "sessionId": sid},
            *lines(sid, 4),
            {"type": "last-prompt", "lastPrompt": "question 2", "sessionId": sid},
            {"type": "atis-latch", "atis": ""}, {"type": "atis-latch", "atis": ""}]
    write_jsonl(project / f"{sid}.jsonl", main)
    sub = [{"type": "user", "uuid": "sub-1", "isSidechain": True,
            "message": {"role": "user", "content": "subagent task"}}]
    write_jsonl(project / sid / "subagents" / "agent-a1.jsonl", sub)
    (project / sid / "subagents" / "agent-a1.meta.json").write_text(
        json.dumps({"agentType": "Explore"})
    )
    other = str(uuidlib.uuid4())
    write_jsonl(config_dir / "projects" / "-other-project" / f"{other}.jsonl", lines(other, 2))

    summary = run("--config-dir", str(config_dir))
    assert summary.startswith("Imported 12 transcript lines from 2 sessions (2 new, 0 updated); "
                              "0 already up to date, 0 skipped, 0 failed"), summary
    assert load(sid) == main  # order, uuid-less lines and duplicates included
    assert load(sid, "subagents/agent-a1") == [*sub, {"agentType": "Explore",
                                                      "type": "agent_metadata"}]
    assert load(other, project_key="-other-project") == lines(other, 2)
    assert [m["text"] for m in async_to_sync(session_messages)(sid)] == [
        "question 0", "answer 1", "question 2", "answer 3"
    ]

    # Second run: nothing new.
    summary = run("--config-dir", str(config_dir))
    assert summary.startswith("Imported 0 transcript lines from 0 sessions (0 new, 0 updated); "
                              "2 already up to date"), summary
    assert load(sid) == main

    # The local session went on: only its new lines come over (uuid-less
    # lines of a key the store already holds are left out).
    write_jsonl(project / f"{sid}.jsonl", [*lines(sid, 2, start=4), {"type": "atis-latch"}])
    summary = run("--config-dir", str(config_dir))
    assert summary.startswith("Imported 2 transcript lines from 1 session (0 new, 1 updated); "
                              "1 already up to date"), summary
    assert load(sid) == [*main, *lines(sid, 2, start=4)]
    assert TranscriptEntry.objects.count() == 12 + 2


def test_catches_up_a_session_mirrored_with_gaps(config_dir):
    sid = str(uuidlib.uuid4())
    everything = lines(sid, 6)
    store = DjangoSessionStore()
    key = {"project_key": PROJECT, "session_id": sid}
    async_to_sync(store.append)(key, everything[:2] + everything[3:4])  # lines 2, 4, 5 missing
    write_jsonl(config_dir / "projects" / PROJECT / f"{sid}.jsonl", everything)
    summary = run("--config-dir", str(config_dir))
    assert summary.startswith("Imported 3 transcript lines from 1 session (0 new, 1 updated)")
    assert sorted(x["n"] for x in load(sid)) == list(range(6))


def test_default_config_dir_skips_and_failures(config_dir, settings):
    settings.CLAUDE_CONFIG_DIR = config_dir
    assert run().startswith("Imported 0 transcript lines from 0 sessions")  # no dir yet: nothing

    project = config_dir / "projects" / PROJECT
    good = str(uuidlib.uuid4())
    write_jsonl(project / f"{good}.jsonl", lines(good, 2))
    write_jsonl(project / "not-a-session.jsonl", lines("x" * 8, 1))
    (project / f"{uuidlib.uuid4()}.jsonl").touch()  # empty
    bad = str(uuidlib.uuid4())
    (project / f"{bad}.jsonl").write_text(json.dumps(lines(bad, 1)[0]) + "\n{not json\n")

    err = StringIO()
    out = StringIO()
    with pytest.raises(CommandError, match="1 session"):
        call_command("import_local_sessions", stdout=out, stderr=err)
    summary = out.getvalue().strip().splitlines()[-1]
    assert "2 skipped, 1 failed" in summary, summary
    assert bad in err.getvalue()
    assert load(good) == lines(good, 2)
    assert os.environ.get("CLAUDE_CONFIG_DIR") != str(config_dir)  # env restored


def test_missing_config_dir_is_an_error(tmp_path):
    with pytest.raises(CommandError, match="not a directory"):
        run("--config-dir", str(tmp_path / "nope"))


@pytest.mark.sdk
def test_imported_cli_session_resumes_from_the_store(tmp_path):
    """A session the CLI wrote with no store at all, imported, then resumed
    with an empty config dir: the history comes from the database."""
    from chat_app.offline_model import start_offline_model

    workdir = tmp_path / "work"
    workdir.mkdir()
    model = start_offline_model()

    try:
        local = tmp_path / "local"
        session_id, _ = async_to_sync(ask)(
            "What is 2+2?", sdk_options(model, local, workdir, store=False))
        summary = run("--config-dir", str(local))
        assert summary.startswith("Imported ") and "(1 new, 0 updated)" in summary, summary
        assert run("--config-dir", str(local)).startswith("Imported 0 transcript lines")

        _, reply = async_to_sync(ask)(
            "What was my last question?",
            sdk_options(model, tmp_path / "empty", workdir, resume=session_id),
        )
        assert '"What is 2+2?"' in reply, reply
        assert [m["text"] for m in async_to_sync(session_messages)(session_id)
                if m["role"] == "user"] == ["What is 2+2?", "What was my last question?"]
    finally:
        model.stop()
