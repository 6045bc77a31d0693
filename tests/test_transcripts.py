"""``sessions_app.transcripts``: the Django ``SessionStore`` and its helpers.

Runs on the embedded libSQL file (default) and on PostgreSQL (``DATABASE_URL``).
The store runs its ORM work in ``sync_to_async`` threads with transactions of
its own, hence ``transaction=True``. SDK tests (marked ``sdk``) drive the real
CLI against the project's offline model.
"""

import asyncio
import json
import threading
import time
import uuid as uuidlib

import pytest
from asgiref.sync import sync_to_async
from claude_agent_sdk import (
    SessionStore,
    fold_session_summary,
    fork_session_via_store,
    get_session_messages_from_store,
    list_sessions_from_store,
    project_key_for_directory,
)
from claude_agent_sdk.testing import run_session_store_conformance
from django.db import connections

from sessions_app.models import TranscriptEntry, TranscriptSummary
from sessions_app.transcripts import (
    DjangoSessionStore,
    erase_session,
    fork_point,
    session_messages,
    transcript_messages,
)
from tests.sdk_helpers import ask, sdk_options

pytestmark = pytest.mark.django_db(transaction=True)

OPTIONAL = ("list_sessions", "list_session_summaries", "delete", "list_subkeys")


def _wipe():
    TranscriptEntry.objects.all().delete()
    TranscriptSummary.objects.all().delete()


def e(n, uuid=None, **fields):
    entry = {"type": "x", "n": n, **fields}
    if uuid is not None:
        entry["uuid"] = uuid
    return entry


KEY = {"project_key": "proj", "session_id": "sess"}


# --- protocol ---------------------------------------------------------------------


async def test_conformance_all_14_contracts():
    store = DjangoSessionStore()
    for method in OPTIONAL:  # nothing is skipped as "not implemented"
        assert getattr(type(store), method) is not getattr(SessionStore, method), method

    calls = 0

    async def make_store():
        nonlocal calls
        calls += 1
        await sync_to_async(_wipe, thread_sensitive=True)()
        return DjangoSessionStore()

    await run_session_store_conformance(make_store)
    assert calls == 15  # one probe + one fresh store per contract


async def test_a_waiter_wakes_when_the_persons_message_is_committed():
    """A turn waits for its message's line (``prompts_stored``) before it
    announces the turn: a tool's answer, a subagent's line or the CLI's own
    meta line do not count; a store that never gets it answers False."""
    store = DjangoSessionStore()
    key = {"project_key": "-srv-omni", "session_id": "s-wait"}
    waiter = asyncio.ensure_future(store.prompts_stored(store.prompts + 1, timeout=10))
    await store.append(key, [
        {"type": "queue-operation", "operation": "enqueue"},
        {"type": "user", "uuid": "m", "isMeta": True, "message": {"content": "caveat"}},
        {"type": "user", "uuid": "t", "message": {"content": [{"type": "tool_result", "content": "x"}]}},
    ])
    await store.append({**key, "subpath": "subagents/agent-1"},
                       [{"type": "user", "uuid": "sub", "message": {"content": "for the subagent"}}])
    await asyncio.sleep(0)
    assert not waiter.done() and store.prompts == 0
    await store.append(key, [{"type": "user", "uuid": "p", "message": {"content": "Hello"}}])
    assert await waiter is True and store.prompts == 1
    assert await store.prompts_stored(1, timeout=0) is True  # already there
    assert await store.prompts_stored(2, timeout=0.05) is False


async def test_constructible_with_alias():
    assert DjangoSessionStore().using == "default"
    assert DjangoSessionStore(using="default").using == "default"


async def test_round_trip_is_exact():
    store = DjangoSessionStore()
    tricky = {
        "type": "user",
        "uuid": "u-1",
        "text": "naïve ☃ \u0000 nul, \ud800 lone surrogate, \"quotes\" \\ back",
        "float": 0.1 + 0.2,
        "big": 2**63 + 1,
        "nested": {"z": [1, {"a": None, "b": False}], "a": []},
        "empty": "",
    }
    await store.append(KEY, [tricky])
    loaded = await store.load(KEY)
    assert loaded == [tricky]
    assert list(loaded[0]) == list(tricky)  # key order kept too (text column)


async def test_retried_batch_is_idempotent():
    store = DjangoSessionStore()
    batch = [e(1, "a"), e(2, "b"), e(3, "c")]
    await store.append(KEY, batch)
    await store.append(KEY, batch)  # the SDK retries a failed batch as a whole
    assert await store.load(KEY) == batch
    # A retry that overlaps a partial write adds only the new lines, in order.
    await store.append(KEY, [e(2, "b"), e(3, "c"), e(4, "d")])
    assert await store.load(KEY) == [*batch, e(4, "d")]
    # A uuid repeated inside one batch is stored once.
    await store.append(KEY, [e(5, "e"), e(5, "e"), e(6, "f")])
    assert [x["n"] for x in await store.load(KEY)] == [1, 2, 3, 4, 5, 6]


async def test_entries_without_uuid_are_appended_without_dedup():
    store = DjangoSessionStore()
    marker = {"type": "atis-latch", "atis": ""}
    await store.append(KEY, [marker, e(1, "a")])
    await store.append(KEY, [marker])
    assert await store.load(KEY) == [marker, e(1, "a"), marker]


async def test_uuid_is_scoped_to_its_key():
    store = DjangoSessionStore()
    sub = {**KEY, "subpath": "subagents/agent-1"}
    other = {"project_key": "proj", "session_id": "sess-2"}
    for key in (KEY, sub, other):
        await store.append(key, [e(1, "same-uuid")])
    for key in (KEY, sub, other):
        assert await store.load(key) == [e(1, "same-uuid")]


async def test_order_across_many_batches():
    store = DjangoSessionStore()
    expected = []
    for b in range(40):
        batch = [
            e(b * 25 + i, f"u-{b}-{i}" if i % 3 else None) for i in range(25)
        ]
        expected += batch
        await store.append(KEY, batch)
    # Interleave another session and a subpath: they must not disturb the order.
    await store.append({**KEY, "subpath": "subagents/agent-1"}, [e(-1, "u-0-1")])
    await store.append({"project_key": "proj", "session_id": "other"}, [e(-2)])
    assert await store.load(KEY) == expected


async def test_large_batch_crosses_the_sql_parameter_limit():
    store = DjangoSessionStore()
    batch = [e(i, str(uuidlib.uuid4())) for i in range(1200)]
    await store.append(KEY, batch)
    await store.append(KEY, batch[600:])
    assert await store.load(KEY) == batch


async def test_paged_load_as_over_a_libsql_server(monkeypatch):
    """Over a libSQL server a load goes in pages (each Hrana answer must stay
    under libsql-client's 4 MiB message limit); the pages add up exactly."""
    from sessions_app import transcripts

    monkeypatch.setattr(transcripts, "_paged", lambda connection: True)
    monkeypatch.setattr(transcripts, "REMOTE_PAGE_CHARS", 2_000)
    store = DjangoSessionStore()
    batch = [e(i, f"u{i}", pad="x" * (i * 97 % 1500)) for i in range(300)]
    batch.append(e(300, "huge", pad="y" * 5_000))  # a line larger than a page: read in pieces
    await store.append(KEY, batch)
    await store.append({**KEY, "subpath": "subagents/a"}, [e(-1, "u1")])
    pieces = []
    long_text = transcripts._long_text
    monkeypatch.setattr(transcripts, "_long_text", lambda *a: pieces.append(a[1:]) or long_text(*a))
    assert await store.load(KEY) == batch
    assert [length for _, length in pieces] == [len(transcripts._dumps(batch[-1]))]
    assert await store.load({**KEY, "session_id": "nope"}) is None


async def test_mtime_is_epoch_ms_and_moves_forward():
    store = DjangoSessionStore()
    before = int(time.time() * 1000)
    await store.append(KEY, [e(1, "a", timestamp="2020-01-01T00:00:00.000Z")])
    after = int(time.time() * 1000)
    [listed] = await store.list_sessions("proj")
    [summary] = await store.list_session_summaries("proj")
    # Storage write time, not the entry's timestamp (2020).
    assert before - 5 <= listed["mtime"] <= after + 5
    assert summary["mtime"] == listed["mtime"]

    mtimes = [listed["mtime"]]
    for i in range(5):  # back-to-back appends still get distinct, rising mtimes
        await store.append(KEY, [e(i + 2)])
        [listed] = await store.list_sessions("proj")
        [summary] = await store.list_session_summaries("proj")
        assert summary["mtime"] == listed["mtime"]
        mtimes.append(listed["mtime"])
    assert mtimes == sorted(set(mtimes))

    # A subagent append does not touch the main session's mtime or summary.
    await store.append({**KEY, "subpath": "subagents/agent-1"}, [e(99)])
    [listed] = await store.list_sessions("proj")
    assert listed["mtime"] == mtimes[-1]


async def test_summary_is_the_sdk_fold():
    store = DjangoSessionStore()
    batches = [
        [
            {"type": "user", "uuid": "u1", "timestamp": "2024-05-01T10:00:00.000Z",
             "cwd": "/work", "message": {"role": "user", "content": "Hello there"}},
            {"type": "assistant", "uuid": "a1", "timestamp": "2024-05-01T10:00:01.000Z",
             "message": {"id": "m1", "role": "assistant",
                         "content": [{"type": "text", "text": "Hi"}]}},
        ],
        [{"type": "custom-title", "customTitle": "Greetings", "sessionId": "sess"}],
        [{"type": "tag", "tag": "demo"}],
    ]
    expected = None
    for batch in batches:
        await store.append(KEY, batch)
        expected = fold_session_summary(expected, KEY, batch)
    [summary] = await store.list_session_summaries("proj")
    assert summary["session_id"] == "sess"
    assert summary["data"] == expected["data"]
    assert summary["data"]["first_prompt"] == "Hello there"
    assert summary["data"]["custom_title"] == "Greetings"

    # The SDK's listing reads the summaries in one call.
    from claude_agent_sdk._internal.session_summary import summary_entry_to_sdk_info

    info = summary_entry_to_sdk_info(summary, None)
    assert info.summary == "Greetings" and info.tag == "demo"
    assert info.created_at == 1714557600000


async def test_delete_main_cascades_and_subpath_is_targeted():
    store = DjangoSessionStore()
    sub1 = {**KEY, "subpath": "subagents/agent-1"}
    sub2 = {**KEY, "subpath": "subagents/workflows/run-1/agent-2"}
    other_project = {"project_key": "elsewhere", "session_id": "sess"}
    for key in (KEY, sub1, sub2, other_project):
        await store.append(key, [e(1, "a"), e(2)])
    assert await store.list_subkeys(KEY) == sorted([sub1["subpath"], sub2["subpath"]])

    await store.delete(sub1)
    assert await store.load(sub1) is None
    assert await store.list_subkeys(KEY) == [sub2["subpath"]]
    assert len(await store.load(KEY)) == 2

    await store.delete(KEY)
    for key in (KEY, sub1, sub2):
        assert await store.load(key) is None
    assert await store.list_subkeys(KEY) == []
    assert await store.list_sessions("proj") == []
    assert await store.list_session_summaries("proj") == []
    assert await store.load(other_project) == [e(1, "a"), e(2)]
    assert [s["session_id"] for s in await store.list_sessions("elsewhere")] == ["sess"]

    # A deleted session can be written again from scratch.
    await store.append(KEY, [e(3, "a")])
    assert await store.load(KEY) == [e(3, "a")]


async def test_concurrent_appends_from_threads_are_serialized():
    """Separate threads = separate connections, like separate server processes:
    batches land whole (never interleaved), none is lost, and the summary row
    of a brand-new session is created exactly once."""
    store = DjangoSessionStore()
    writers, per_batch, batches = 4, 30, 5
    errors = []

    def write(w):
        try:
            for b in range(batches):
                store._append(KEY, [e(i, f"w{w}-b{b}-{i}", writer=w, batch=b)
                                    for i in range(per_batch)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    await asyncio.to_thread(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
    assert errors == []
    loaded = await store.load(KEY)
    assert len(loaded) == writers * per_batch * batches
    runs = [(x["writer"], x["batch"]) for x in loaded]
    chunks = [runs[i : i + per_batch] for i in range(0, len(runs), per_batch)]
    assert all(len(set(chunk)) == 1 for chunk in chunks), "a batch was interleaved"
    assert await sync_to_async(TranscriptSummary.objects.count)() == 1
    # Each writer's batches keep their own order.
    for w in range(writers):
        assert [b for (ww, b) in runs[::per_batch] if ww == w] == list(range(batches))


async def test_list_sessions_scoped_to_project():
    store = DjangoSessionStore()
    for sid in ("s1", "s2", "s3"):
        await store.append({"project_key": "p", "session_id": sid}, [e(1)])
    await store.append({"project_key": "q", "session_id": "s4"}, [e(1)])
    await store.append({"project_key": "p", "session_id": "s5", "subpath": "subagents/a"}, [e(1)])
    assert sorted(s["session_id"] for s in await store.list_sessions("p")) == ["s1", "s2", "s3"]
    assert [s["session_id"] for s in await store.list_session_summaries("q")] == ["s4"]


# --- erase_session ----------------------------------------------------------------


async def test_erase_session_everywhere():
    store = DjangoSessionStore()
    keys = [
        {"project_key": "p1", "session_id": "doomed"},
        {"project_key": "p1", "session_id": "doomed", "subpath": "subagents/agent-1"},
        {"project_key": "p2", "session_id": "doomed"},
    ]
    for key in keys:
        await store.append(key, [e(1, "a"), e(2, "b")])
    survivor = {"project_key": "p1", "session_id": "survivor"}
    await store.append(survivor, [e(1, "a")])

    # 6 lines + 2 summaries (p1, p2)
    assert await erase_session("doomed") == 8
    for key in keys:
        assert await store.load(key) is None
    assert [s["session_id"] for s in await store.list_sessions("p1")] == ["survivor"]
    assert await store.list_sessions("p2") == []
    assert await store.load(survivor) == [e(1, "a")]
    assert await erase_session("doomed") == 0


# --- session_messages -------------------------------------------------------------

SID = "7b1c9a40-0d7e-4c43-9d7b-3f3c6d2f7a11"


def realistic_transcript():
    """Lines shaped like the CLI's own (see a real run in the sdk tests)."""

    def user(uuid, content, **extra):
        return {"parentUuid": None, "isSidechain": False, "type": "user",
                "message": {"role": "user", "content": content}, "uuid": uuid,
                "timestamp": "2026-01-01T00:00:00.000Z", "sessionId": SID, **extra}

    def assistant(uuid, message_id, *blocks):
        return {"parentUuid": None, "isSidechain": False, "type": "assistant",
                "message": {"id": message_id, "type": "message", "role": "assistant",
                            "content": list(blocks)},
                "uuid": uuid, "timestamp": "2026-01-01T00:00:01.000Z", "sessionId": SID}

    def text(t):
        return {"type": "text", "text": t}

    return [
        {"type": "queue-operation", "operation": "enqueue", "content": "What is 2+2?",
         "sessionId": SID},
        {"type": "queue-operation", "operation": "dequeue", "sessionId": SID},
        user("u1", "What is 2+2?", promptSource="sdk"),
        {"type": "attachment", "uuid": "att1", "isSidechain": False,
         "attachment": {"type": "date", "date": "2026-01-01"},
         "rendered": [{"content": "<system-reminder>\nToday's date\n</system-reminder>"}]},
        assistant("a1", "msg_1", {"type": "thinking", "thinking": "easy", "signature": "s"}),
        assistant("a2", "msg_1", text("It is 4.")),
        assistant("a3", "msg_1", text("Anything else?")),
        {"type": "last-prompt", "lastPrompt": "What is 2+2?", "sessionId": SID},
        user("u2", [text("<system-reminder>\nThe date changed.\n</system-reminder>"),
                    text("Now list the files")]),
        assistant("a4", "msg_2", text("Let me look."),
                  {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                   "input": {"command": "ls"}}),
        user("u3", [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}],
             toolUseResult={"stdout": "a.txt"}),
        assistant("a5", "msg_3", text("There is one file: a.txt.")),
        user("u4", "<command-name>/cost</command-name>\n<command-message>cost</command-message>\n"
                   "<command-args></command-args>"),
        user("u5", "<local-command-stdout>Total cost: $0.01</local-command-stdout>"),
        user("u6", "Caveat: the messages below were generated by the user", isMeta=True),
        user("u7", [text("[Request interrupted by user]")]),
        user("u8", "Summary of the earlier conversation", isCompactSummary=True),
        user("u8b", "Please [fail]"),
        {**assistant("err", "synthetic-1", text("API Error: 400 offline model: requested failure")),
         "isApiErrorMessage": True, "apiErrorStatus": 400},
        user("u8c", "Cut short by a crash"),
        # what the CLI puts after a dangling message when the session is resumed
        {**assistant("syn", "synthetic-2", text("No response requested.")),
         "message": {"id": "synthetic-2", "type": "message", "role": "assistant", "model": "<synthetic>",
                     "content": [text("No response requested.")]}},
        user("u9", "Thanks!  "),
        assistant("a6", "msg_4", text("You're welcome.")),
        {"type": "cost-state", "sessionId": SID, "totalCostUSD": 0.01},
    ]


EXPECTED_CONVERSATION = [
    {"role": "user", "text": "What is 2+2?", "uuid": "u1"},
    {"role": "assistant", "text": "It is 4.\n\nAnything else?", "uuid": "a2"},
    {"role": "user", "text": "Now list the files", "uuid": "u2"},
    {"role": "assistant", "text": "Let me look.", "uuid": "a4", "toolCalls": [
        {"toolUseId": "toolu_1", "tool": "Bash", "input": {"command": "ls"}, "result": "a.txt",
         "isError": False, "approval": None}]},  # its result from the user entry that carried it
    {"role": "assistant", "text": "There is one file: a.txt.", "uuid": "a5"},
    {"role": "user", "text": "Please [fail]", "uuid": "u8b"},
    {"role": "user", "text": "Cut short by a crash", "uuid": "u8c"},
    {"role": "user", "text": "Thanks!", "uuid": "u9"},
    {"role": "assistant", "text": "You're welcome.", "uuid": "a6"},
]


async def test_session_messages_on_a_realistic_transcript():
    store = DjangoSessionStore()
    lines = realistic_transcript()
    key = {"project_key": "-srv-omni", "session_id": SID}
    await store.append(key, lines[:7])  # one reply split across two batches
    await store.append(key, lines[7:])
    # Subagent lines never show up in the main conversation.
    await store.append({**key, "subpath": "subagents/agent-1"},
                       [{"type": "user", "uuid": "s1", "isSidechain": True,
                         "message": {"role": "user", "content": "subagent prompt"}}])
    assert await session_messages(SID) == EXPECTED_CONVERSATION
    assert await session_messages("no-such-session") == []


async def test_fork_point_covers_the_whole_reply():
    store = DjangoSessionStore()
    await store.append({"project_key": "-srv-omni", "session_id": SID}, realistic_transcript())
    assert await fork_point(SID, "u1") == "u1"
    assert await fork_point(SID, "a2") == "a3"  # msg_1 goes on in a3
    assert await fork_point(SID, "a4") == "a4"  # the tool's result is the next turn
    assert await fork_point(SID, "a6") == "a6"
    assert await fork_point(SID, "nope") is None
    assert await fork_point("no-such-session", "u1") is None


async def test_session_messages_uses_the_newest_project_key():
    store = DjangoSessionStore()
    old = {"project_key": "-old-cwd", "session_id": SID}
    new = {"project_key": "-new-cwd", "session_id": SID}
    await store.append(old, [{"type": "user", "uuid": "o", "message": {"content": "old"}}])
    await store.append(new, [{"type": "user", "uuid": "n", "message": {"content": "new"}}])
    assert await session_messages(SID) == [{"role": "user", "text": "new", "uuid": "n"}]
    await store.append(old, [{"type": "user", "uuid": "o2", "message": {"content": "again"}}])
    assert [m["text"] for m in await session_messages(SID)] == ["old", "again"]


def test_transcript_messages_ignores_junk():
    assert transcript_messages([
        None, "text", {"type": "user"}, {"type": "user", "message": "x"},
        {"type": "assistant", "message": {"content": None}},
        {"type": "user", "uuid": "u", "message": {"content": "<tick>"}},
        {"type": "user", "uuid": "u", "message": {"content": "use <b>bold</b> here"}},
        {"type": "user", "uuid": "v", "message": {"content": "what is a <system-reminder>?"}},
        {"type": "user", "uuid": "w", "message": {"content": "<system-reminder>unclosed"}},
    ]) == [{"role": "user", "text": "use <b>bold</b> here", "uuid": "u"},
           {"role": "user", "text": "what is a <system-reminder>?", "uuid": "v"}]


# --- the real SDK and CLI ---------------------------------------------------------


@pytest.fixture(scope="module")
def offline_model():
    from chat_app.offline_model import start_offline_model

    model = start_offline_model()
    yield model
    model.stop()




@pytest.mark.sdk
async def test_sdk_resume_materializes_from_the_database(offline_model, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    tmp_a, tmp_b, tmp_c = tmp_path / "config-a", tmp_path / "config-b", tmp_path / "config-c"

    session_id, reply = await ask("What is 2+2?", sdk_options(offline_model, tmp_a, workdir))
    assert session_id and reply == 'Offline model heard: "What is 2+2?". Earlier questions: none.'
    project_key = project_key_for_directory(workdir)
    key = {"project_key": project_key, "session_id": session_id}
    store = DjangoSessionStore()
    first = await store.load(key)
    assert first and any(x.get("type") == "user" for x in first)
    # The mirror is a copy of the local file, keyed by the file's project dir.
    assert (tmp_a / "projects" / project_key / f"{session_id}.jsonl").exists()

    # Resume with an EMPTY config dir: the transcript can only come from the store.
    resumed_id, reply = await ask(
        "What was my last question?",
        sdk_options(offline_model, tmp_b, workdir, resume=session_id),
    )
    assert resumed_id == session_id
    assert '"What is 2+2?"' in reply, reply
    assert reply.startswith('Offline model heard: "What was my last question?"')
    assert not list(tmp_b.glob("projects/*/*.jsonl"))  # nothing written locally

    # The resumed turn appended only its new lines: no uuid twice, order kept.
    loaded = await store.load(key)
    assert loaded[: len(first)] == first and len(loaded) > len(first)
    uuids = [x["uuid"] for x in loaded if "uuid" in x]
    assert len(uuids) == len(set(uuids))

    conversation = await session_messages(session_id)
    assert [(m["role"], m["text"]) for m in conversation] == [
        ("user", "What is 2+2?"),
        ("assistant", 'Offline model heard: "What is 2+2?". Earlier questions: none.'),
        ("user", "What was my last question?"),
        ("assistant", 'Offline model heard: "What was my last question?". '
                      'Earlier questions: "What is 2+2?".'),
    ]
    assert all(m["uuid"] for m in conversation)

    # The SDK's own store readers agree (summaries and messages).
    [info] = await list_sessions_from_store(store, directory=str(workdir))
    assert info.session_id == session_id and info.first_prompt == "What is 2+2?"
    sdk_messages = await get_session_messages_from_store(store, session_id, str(workdir))
    assert [m.uuid for m in sdk_messages if m.type == "user"][0] == conversation[0]["uuid"]

    # Resume is keyed by cwd: from another directory the store has no such
    # session and the CLI cannot find it either.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(Exception, match="No conversation found"):
        await ask("Hello?", sdk_options(offline_model, tmp_c, elsewhere, resume=session_id))


@pytest.mark.sdk
async def test_sdk_fork_writes_a_new_session(offline_model, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    session_id, _ = await ask("First question?",
                              sdk_options(offline_model, tmp_path / "a", workdir))
    fork_id, reply = await ask(
        "Forked question?",
        sdk_options(offline_model, tmp_path / "b", workdir, resume=session_id, fork_session=True),
    )
    assert fork_id and fork_id != session_id
    assert reply == 'Offline model heard: "Forked question?". Earlier questions: "First question?".'
    # The fork is a session of its own: history copied in, the source untouched.
    assert [m["text"] for m in await session_messages(fork_id) if m["role"] == "user"] == [
        "First question?", "Forked question?"
    ]
    assert [m["text"] for m in await session_messages(session_id) if m["role"] == "user"] == [
        "First question?"
    ]
    store = DjangoSessionStore()
    listed = await store.list_sessions(project_key_for_directory(workdir))
    assert sorted(s["session_id"] for s in listed) == sorted([session_id, fork_id])
    raw = await sync_to_async(
        lambda: [json.loads(d) for d in TranscriptEntry.objects.filter(session_id=fork_id)
                 .values_list("data", flat=True)]
    )()
    assert all(x.get("sessionId", fork_id) == fork_id for x in raw)


@pytest.mark.sdk
async def test_sdk_fork_at_a_message_via_store(offline_model, tmp_path):
    """Fork at a message the page shows (``atMessageUuid``): the SDK's
    ``fork_session_via_store`` copies the transcript up to :func:`fork_point`
    into a new session of the store; resuming it continues from there."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    session_id, _ = await ask("Question one?", sdk_options(offline_model, tmp_path / "a", workdir))
    await ask("Question two?", sdk_options(offline_model, tmp_path / "b", workdir,
                                           resume=session_id))
    conversation = await session_messages(session_id)
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 2
    first_reply = conversation[1]

    store = DjangoSessionStore()
    fork = await fork_session_via_store(
        store, session_id, directory=str(workdir),
        up_to_message_id=await fork_point(session_id, first_reply["uuid"]),
    )
    assert [m["text"] for m in await session_messages(fork.session_id)] == [
        "Question one?", first_reply["text"]
    ]
    fork_id, reply = await ask("Question three?", sdk_options(
        offline_model, tmp_path / "c", workdir, resume=fork.session_id))
    assert fork_id == fork.session_id
    assert reply == ('Offline model heard: "Question three?". '
                     'Earlier questions: "Question one?".')
