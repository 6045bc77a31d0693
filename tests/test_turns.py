"""The turn pipeline itself, in this process (real SDK and CLI, offline model)."""

import json

import pytest

from chat_app.turns import registry, start_turn
from sessions_app import selectors, services
from tests.helpers import events_of, turn_bodies

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]


body = turn_bodies("erin", "pipe-1")


async def test_the_next_turn_may_start_as_soon_as_done_is_seen(offline_chat):
    first = await start_turn(None, body("What is 2+2?"))
    events = await events_of(first)
    assert events[-1]["type"] == "done"
    # No other task has run since "done" was read: the thread is free already.
    second = await start_turn(None, body("And now?"))
    assert registry.get("erin", "pipe-1") is second
    events = await events_of(second)
    assert events[0]["resumed"] is True and events[-1]["type"] == "done"
    assert registry.get("erin", "pipe-1") is None


async def test_a_listener_joining_late_gets_every_event(offline_chat):
    turn = await start_turn(None, body("Hello there", thread="pipe-2"))
    live = await events_of(turn)
    assert await events_of(turn) == live  # replay after the end: same events, same order
    assert [e["type"] for e in live][0] == "session" and live[-1]["type"] == "done"


async def test_a_missing_transcript_starts_a_fresh_session_with_a_notice(offline_chat):
    await services.save_session("pipe-3", "erin", "00000000-0000-4000-8000-000000000000",
                                user_message="lost")
    events = await events_of(await start_turn(None, body("Do you remember?", thread="pipe-3")))
    session = events[0]
    assert session["type"] == "session" and session["resumed"] is False
    assert "could not be resumed" in session["notice"]
    assert session["sessionId"] != "00000000-0000-4000-8000-000000000000"
    text = "".join(e["text"] for e in events if e["type"] == "text")
    assert text == 'Offline model heard: "Do you remember?". Earlier questions: none.'
    mapping = await selectors.get_metadata("pipe-3", "erin")
    assert mapping.session_id == session["sessionId"]


async def test_a_model_error_ends_in_done_with_is_error_and_is_not_counted(offline_chat):
    events = await events_of(await start_turn(None, body("boom [fail]", thread="pipe-4")))
    assert events[-1]["type"] == "done" and events[-1]["result"]["isError"] is True
    mapping = await selectors.get_metadata("pipe-4", "erin")
    assert mapping.message_count == 1  # the user's message; the API error is no reply


async def test_an_unreachable_model_ends_the_turn_with_model_unavailable(offline_chat, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    offline_chat.OMNI_OFFLINE_MODEL = False
    offline_chat.OMNI_MODEL_MAX_RETRIES = 1
    monkeypatch.setenv("ANTHROPIC_BASE_URL", dead)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "unused")
    events = await events_of(await start_turn(None, body("Anyone there?", thread="pipe-5")))
    assert events[0]["type"] == "session"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "model_unavailable"
    assert events[-1]["retryAfter"] >= 1
    # the model's (internal) address stays in the server's log
    assert dead.split("//")[1] not in json.dumps(events)
    mapping = await selectors.get_metadata("pipe-5", "erin")
    assert mapping.message_count == 1  # the user's message is kept; it resumes later


async def test_no_event_names_a_server_path_or_the_api_key_source(offline_chat):
    """The CLI's init message carries its working directory, config paths and
    where its API key came from: none of it reaches a client."""
    events = await events_of(await start_turn(None, body("Where do you run?", thread="pipe-6")))
    init = next(e["chunk"] for e in events if e["type"] == "chunk" and e["chunk"].get("subtype") == "init")
    assert init["data"]["session_id"] == events[0]["sessionId"]  # the rest of it is there
    for key in ("cwd", "original_cwd", "apiKeySource", "memory_paths", "messaging_socket_path"):
        assert key not in init["data"], key
    text = json.dumps(events)
    for path in (offline_chat.OMNI_WORKSPACE_DIR, offline_chat.CLAUDE_CONFIG_DIR, offline_chat.DATA_DIR):
        assert str(path) not in text, path


async def test_a_failing_turn_tells_the_client_no_exception_text(offline_chat, monkeypatch):
    from chat_app.turns import runner

    async def broken(*args, **kwargs):
        raise RuntimeError("could not connect to db.internal.example:5432")

    monkeypatch.setattr(runner.store, "save", broken)
    events = await events_of(await start_turn(None, body("Hello", thread="pipe-7")))
    assert events[-1]["type"] == "error" and events[-1]["code"] == "turn_failed"
    assert "db.internal" not in json.dumps(events) and events[-1]["turnId"] in events[-1]["message"]


async def test_the_session_event_comes_once_the_message_is_stored(offline_chat, monkeypatch):
    """The person's message is in the transcript store before the turn
    announces itself (``session``): a client that saw it knows the message
    survives its worker dying. The store's commit of a message is made slow
    here; the warm follow-up (no database work of its own before
    ``session``) would otherwise announce it first."""
    import time

    from sessions_app.transcripts import DjangoSessionStore

    committed: list[str] = []
    original = DjangoSessionStore._append

    def slow_append(self, key, entries):
        prompts = [e["message"]["content"] for e in entries
                   if e.get("type") == "user" and isinstance(e.get("message", {}).get("content"), str)]
        if prompts:
            time.sleep(0.3)
        original(self, key, entries)
        committed.extend(prompts)

    monkeypatch.setattr(DjangoSessionStore, "_append", slow_append)
    for message in ("First", "Again"):
        turn = await start_turn(None, body(message, thread="stored-first"))
        async for event in turn.listen():
            if event["type"] == "session":
                assert committed[-1:] == [message], committed
        assert turn.events[-1]["type"] == "done"


async def test_a_warm_follow_up_costs_few_sql_statements(offline_chat, monkeypatch):
    """The warm path's database work (issue 18): the thread's lease, its
    mapping with the budget (its override and the day's spend: read at every
    check, so an override saved on any worker applies at once, issue 21, in
    the mapping's SELECT) and the limits before the turn (one trip); the lease's release if
    still held, the mapping and the turn's record after it (one trip, one
    transaction).
    (The SDK's own transcript append comes on top: the store's business.)"""
    from django.db.backends import utils

    statements = []
    original = utils.CursorWrapper.execute

    def execute(self, sql, params=None):
        statements.append(sql)
        return original(self, sql, params)

    # An amortized check comes with the first turn: the limits' prune of old
    # starts (at most once a minute; the fixture resets its timer).
    await events_of(await start_turn(None, body("First", thread="few-sql")))
    monkeypatch.setattr(utils.CursorWrapper, "execute", execute)
    events = await events_of(await start_turn(None, body("Again", thread="few-sql")))
    assert events[-1]["type"] == "done"
    # BEGINs open transactions (one is the store's append): not statements of their own
    ours = [s for s in statements if "transcript" not in s and not s.startswith("BEGIN")]
    assert len(ours) <= 6, "\n".join(ours)
    reads = [s for s in ours if s.startswith("SELECT") and "sessionmapping" in s]
    assert len(reads) == 1, "the mapping is read once, before the turn"
