"""Tests for chat_app.offline_model: raw HTTP shapes, then the real SDK + CLI against it.

Run: .venv/bin/python -m pytest tests/test_offline_model.py   (SDK tests are marked ``sdk``)
"""
import asyncio
import http.client
import json
import time

import pytest

from chat_app.offline_model import reply_text, start_offline_model, user_texts
from tests.helpers import anthropic_sse

pytestmark = pytest.mark.engine_agnostic


@pytest.fixture(scope="module")
def model():
    m = start_offline_model()
    yield m
    m.stop()


def _post(model, path, body, conn=None):
    conn = conn or http.client.HTTPConnection(model.host, model.port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read().decode()


def _msgs(*texts):
    return [{"role": "user", "content": t} for t in texts]


# --- reply format ---------------------------------------------------------------

def test_reply_format_and_filtering():
    assert reply_text(_msgs("hi")) == 'Offline model heard: "hi". Earlier questions: none.'
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nstuff\n</system-reminder>"},
            {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ignored"}]},
        {"role": "system", "content": "# Environment ..."},
        {"role": "user", "content": "second"},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "x", "content": "ignored"},
            {"type": "text", "text": "[Request interrupted by user]\n"},
            {"type": "text", "text": "x" * 300, "cache_control": {"type": "ephemeral"}}]},
    ]
    assert user_texts(messages) == ["first", "second", "x" * 300]
    assert reply_text(messages) == (
        f'Offline model heard: "{"x" * 200}". Earlier questions: "first" | "second".')


# --- raw HTTP -------------------------------------------------------------------

def test_streaming_shape(model):
    resp, raw = _post(model, "/v1/messages?beta=true",
                      {"model": "m", "max_tokens": 50, "stream": True,
                       "messages": _msgs("a", "What is 2+2?")})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = anthropic_sse(raw)
    names = [n for n, _ in events if n != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in events)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 4 and all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == (
        'Offline model heard: "What is 2+2?". Earlier questions: "a".')
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["model"] == "m"
    assert start["usage"]["input_tokens"] > 0
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] > 0


def test_non_streaming_count_tokens_and_keep_alive(model):
    conn = http.client.HTTPConnection(model.host, model.port, timeout=10)
    before = len(model.requests)
    for _ in range(2):  # same connection twice: keep-alive works after SSE and JSON
        _post(model, "/v1/messages", {"stream": True, "messages": _msgs("s")}, conn)
        resp, raw = _post(model, "/v1/messages", {"model": "m", "messages": _msgs("q")}, conn)
        msg = json.loads(raw)
        assert resp.status == 200 and msg["type"] == "message" and msg["stop_reason"] == "end_turn"
        assert msg["content"] == [{"type": "text",
                                   "text": 'Offline model heard: "q". Earlier questions: none.'}]
        assert msg["usage"]["output_tokens"] == len(msg["content"][0]["text"]) // 4 + 1
    assert len(model.requests) == before + 4
    resp, raw = _post(model, "/v1/messages/count_tokens?beta=true", {"messages": _msgs("q")}, conn)
    assert resp.status == 200 and json.loads(raw)["input_tokens"] > 0
    resp, raw = _post(model, "/v1/nope", {}, conn)
    assert resp.status == 404 and json.loads(raw)["type"] == "error"
    assert ("POST", "/v1/nope") in model.unknown
    conn.close()


def test_fail_marker(model):
    resp, raw = _post(model, "/v1/messages", {"stream": True, "messages": _msgs("[fail] x")})
    assert resp.status == 400
    assert json.loads(raw) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "offline model: requested failure"}}


def test_slow_marker_and_json_format(model):
    model.slow_delay = 0.005
    try:
        _, raw = _post(model, "/v1/messages", {"stream": True, "messages": _msgs("[slow] go")})
    finally:
        model.slow_delay = 0.1
    assert sum(n == "content_block_delta" for n, _ in anthropic_sse(raw)) == 30
    schema = {"type": "object", "properties": {"title": {"type": "string"}},
              "required": ["title"], "additionalProperties": False}
    _, raw = _post(model, "/v1/messages", {
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "messages": _msgs("<session>\nhi\n</session>\n\nWrite the title")})
    assert json.loads(json.loads(raw)["content"][0]["text"]) == {"title": "Offline session"}


# --- real SDK + bundled CLI -------------------------------------------------------

sdk = pytest.importorskip("claude_agent_sdk")


def _options(model, tmp_path, **kw):
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    env = {"ANTHROPIC_BASE_URL": model.base_url, "ANTHROPIC_API_KEY": "sk-offline-test",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CONFIG_DIR": str(tmp_path / "cfg")}
    return sdk.ClaudeAgentOptions(env=env, cwd=str(tmp_path / "work"),
                                  include_partial_messages=True, system_prompt="You are a test.",
                                  allowed_tools=[], max_turns=1, **kw)


async def _run(prompt, options):
    """(result, assistant_text, streamed_text_deltas, init_session_id)."""
    result, texts, deltas, init_sid = None, [], [], None
    async for msg in sdk.query(prompt=prompt, options=options):
        if isinstance(msg, sdk.SystemMessage) and msg.subtype == "init":
            init_sid = msg.data["session_id"]
        elif isinstance(msg, sdk.AssistantMessage):
            texts += [b.text for b in msg.content if isinstance(b, sdk.TextBlock)]
        elif isinstance(msg, sdk.StreamEvent) and msg.event["type"] == "content_block_delta":
            deltas.append(msg.event["delta"]["text"])
        elif isinstance(msg, sdk.ResultMessage):
            result = msg
    return result, "".join(texts), deltas, init_sid


@pytest.mark.sdk
def test_sdk_turn_resume_and_fork(model, tmp_path):
    unknown_before = list(model.unknown)

    async def scenario():
        t0 = time.monotonic()
        res, text, deltas, init_sid = await _run("What is 2+2?", _options(model, tmp_path))
        assert time.monotonic() - t0 < 30  # expected a few seconds (a CLI's start and one turn)
        assert res is not None and res.is_error is False and res.subtype == "success"
        assert text == 'Offline model heard: "What is 2+2?". Earlier questions: none.'
        assert len(deltas) >= 4 and "".join(deltas) == text
        sid = res.session_id
        assert init_sid == sid

        res2, text2, _, _ = await _run("What was my last question?",
                                       _options(model, tmp_path, resume=sid))
        assert res2.is_error is False
        assert text2 == ('Offline model heard: "What was my last question?". '
                         'Earlier questions: "What is 2+2?".')
        assert res2.session_id == sid  # plain resume keeps the session id

        res3, text3, _, init3 = await _run("Forked?",
                                           _options(model, tmp_path, resume=sid, fork_session=True))
        assert res3.is_error is False
        assert res3.session_id != sid and init3 == res3.session_id
        assert text3 == ('Offline model heard: "Forked?". Earlier questions: '
                         '"What is 2+2?" | "What was my last question?".')

    asyncio.run(scenario())
    assert model.unknown == unknown_before  # the CLI asked for nothing but /v1/messages


@pytest.mark.sdk
def test_sdk_fail_marker(model, tmp_path):
    seen = []

    async def scenario():
        async for msg in sdk.query(prompt="[fail] please", options=_options(model, tmp_path)):
            seen.append(msg)

    # The CLI reports the 400 as an error result, then exits 1, which the SDK raises.
    with pytest.raises(Exception, match="offline model: requested failure"):
        asyncio.run(scenario())
    result = next(m for m in seen if isinstance(m, sdk.ResultMessage))
    assert result.is_error is True
