"""The offline model's tool calls: ``[tool NAME {json}]`` markers, then the real CLI running them.

Raw HTTP first (the Messages API shapes of a ``tool_use`` reply, the replies to
``tool_result``s), then the real SDK + bundled CLI with an in-process SDK MCP server
whose tool records its calls (allowed, denied by ``can_use_tool``, absent).
"""
import asyncio
import http.client
import json
import time

import pytest

from chat_app.offline_model import (
    answer,
    bad_tool_text,
    calling_text,
    find_tool,
    no_tool_text,
    reply_text,
    result_text,
    start_offline_model,
    tool_markers,
)
from tests.helpers import anthropic_sse

pytestmark = pytest.mark.engine_agnostic

TOOLS = [{"name": "DeferredToolPlaceholder", "input_schema": {"type": "object"},
          "defer_loading": True},
         {"name": "mcp__s__echo", "input_schema": {"type": "object"}},
         {"name": "mcp__s__add", "input_schema": {"type": "object"}},
         {"name": "add", "input_schema": {"type": "object"}}]


@pytest.fixture(scope="module")
def model():
    m = start_offline_model()
    yield m
    m.stop()


def _post(model, body):
    conn = http.client.HTTPConnection(model.host, model.port, timeout=30)
    conn.request("POST", "/v1/messages?beta=true", json.dumps(body),
                  {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    return resp, raw


def _user(text):
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _called(tool_id, name, value, text=None):
    text = text if text is not None else calling_text(name)
    return {"role": "assistant", "content": [
        {"type": "text", "text": text},
        {"type": "tool_use", "id": tool_id, "name": name, "input": value}]}


def _result(tool_id, content, is_error=False, extra=()):
    block = {"type": "tool_result", "tool_use_id": tool_id, "content": content}
    if is_error:
        block["is_error"] = True
    return {"role": "user", "content": [block, *extra]}


# --- markers and names ----------------------------------------------------------------

def test_markers_parse_names_and_json_inputs():
    assert tool_markers("no markers [tool] [toolx a]") == []
    assert tool_markers("[tool a] then [tool  b {}]") == [("a", {}), ("b", {})]
    nested = '[tool mcp__s__echo {"q": "x ] y", "n": {"m": [1, 2]}} ] tail'
    assert tool_markers(nested) == [("mcp__s__echo", {"q": "x ] y", "n": {"m": [1, 2]}})]
    assert tool_markers('[tool c {bad}] [tool d 5] [tool e {"a": 1} junk] [tool f') == [
        ("c", None), ("d", None), ("e", None), ("f", None)]


def test_find_tool_exact_then_mcp_suffix():
    assert find_tool("echo", TOOLS) == "mcp__s__echo"
    assert find_tool("mcp__s__echo", TOOLS) == "mcp__s__echo"
    assert find_tool("add", TOOLS) == "add"  # an exact name wins over a suffix
    assert find_tool("s__echo", TOOLS) == "mcp__s__echo"  # <server>__<name> picks a server
    assert find_tool("x__echo", TOOLS) is None and find_tool("ech", TOOLS) is None
    assert find_tool("echo", None) is None and find_tool("echo", []) is None


# --- replies, conversation by conversation ----------------------------------------------

def test_two_markers_are_called_one_after_the_other():
    typed = '[tool echo {"text": "hi"}] [tool add {"a": 1, "b": 2}] please'
    messages = [_user("earlier"), {"role": "assistant", "content": "ok"}, _user(typed)]
    first = answer({"messages": messages, "tools": TOOLS})
    assert [b["type"] for b in first] == ["text", "tool_use"]
    assert first[0] == {"type": "text", "text": "Calling mcp__s__echo."}
    call = first[1]
    assert call["name"] == "mcp__s__echo" and call["input"] == {"text": "hi"}
    assert call["id"].startswith("toolu_offline_")

    messages += [_called(call["id"], "mcp__s__echo", {"text": "hi"}),
                 _result(call["id"], [{"type": "text", "text": "echoed hi"}])]
    second = answer({"messages": messages, "tools": TOOLS})
    assert second[0]["text"] == 'Offline model got from mcp__s__echo: "echoed hi".\nCalling add.'
    assert second[1]["name"] == "add" and second[1]["input"] == {"a": 1, "b": 2}
    assert second[1]["id"] != call["id"]

    messages += [_called(second[1]["id"], "add", {"a": 1, "b": 2}, second[0]["text"]),
                 _result(second[1]["id"], "3")]
    third = answer({"messages": messages, "tools": TOOLS})
    assert third == [{"type": "text", "text": (
        'Offline model got from add: "3".\n'
        f'Offline model heard: "{typed}". Earlier questions: "earlier".')}]
    assert third[0]["text"] == result_text("add", "3") + "\n" + reply_text(messages)

    # The next typed message is a new turn: no markers, the plain reply.
    messages += [{"role": "assistant", "content": third}, _user("and now?")]
    assert answer({"messages": messages, "tools": TOOLS}) == [
        {"type": "text", "text": reply_text(messages)}]
    assert reply_text(messages) == (
        f'Offline model heard: "and now?". Earlier questions: "earlier" | "{typed}".')


def test_errors_absent_tools_bad_input_and_long_results():
    typed = '[tool nope] [tool echo {"text": oops}] [tool echo]'
    messages = [_user(typed)]
    first = answer({"messages": messages, "tools": TOOLS})
    assert first[0]["text"] == "\n".join([
        "Offline model: no tool nope here.",
        "Offline model: bad input for tool echo (a JSON object, then ]).",
        "Calling mcp__s__echo."])
    assert first[0]["text"] == "\n".join([no_tool_text("nope"), bad_tool_text("echo"),
                                         calling_text("mcp__s__echo")])
    assert first[1]["input"] == {}
    long = "y" * 300
    messages += [_called("t1", "mcp__s__echo", {}, first[0]["text"]),
                 _result("t1", [{"type": "text", "text": long}, {"type": "image"}],
                         is_error=True,
                         extra=[{"type": "text", "text": "<system-reminder>x</system-reminder>"}])]
    last = answer({"messages": messages, "tools": TOOLS})
    assert last[0]["text"] == (f'Offline model was refused mcp__s__echo: "{"y" * 200}".\n'
                               f'Offline model heard: "{typed}". Earlier questions: none.')
    # No tools offered at all: each marker is said to be absent, in the only reply.
    alone = answer({"messages": [_user("[tool echo] [tool add {}] x")]})
    assert alone == [{"type": "text", "text": (
        "Offline model: no tool echo here.\nOffline model: no tool add here.\n"
        'Offline model heard: "[tool echo] [tool add {}] x". Earlier questions: none.')}]


def test_a_result_that_comes_with_new_typed_text_is_not_quoted():
    """After an interrupt the CLI may send the cancelled call's result together with the
    next typed message: that is a new turn, answered exactly as without tools."""
    messages = [_user("[tool echo] a"), _called("t1", "mcp__s__echo", {}),
                _result("t1", "Interrupted", is_error=True, extra=[
                    {"type": "text", "text": "[Request interrupted by user for tool use]"},
                    {"type": "text", "text": "next"}])]
    assert answer({"messages": messages, "tools": TOOLS}) == [{"type": "text", "text": (
        'Offline model heard: "next". Earlier questions: "[tool echo] a".')}]


# --- raw HTTP -----------------------------------------------------------------------------

def test_streamed_tool_use_shape(model):
    resp, raw = _post(model, {"model": "m", "stream": True, "tools": TOOLS, "messages": [
        _user('[tool echo {"text": "a longer input to split", "n": [1, 2, 3]}] go')]})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = anthropic_sse(raw)
    assert all(n == d["type"] for n, d in events)
    names = [n for n, _ in events if n not in ("ping", "content_block_delta")]
    assert names == ["message_start", "content_block_start", "content_block_stop",
                     "content_block_start", "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["model"] == "m"
    starts = [d for n, d in events if n == "content_block_start"]
    assert starts[0] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    tool = starts[1]["content_block"]
    assert starts[1]["index"] == 1
    assert tool["type"] == "tool_use" and tool["name"] == "mcp__s__echo" and tool["input"] == {}
    assert tool["id"].startswith("toolu_offline_") and tool["id"][14:].isdigit()
    text = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert all(d["type"] == "text_delta" for d in text)
    assert "".join(d["text"] for d in text) == "Calling mcp__s__echo."
    parts = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 1]
    assert all(d["type"] == "input_json_delta" for d in parts) and len(parts) >= 3
    assert json.loads("".join(d["partial_json"] for d in parts)) == {
        "text": "a longer input to split", "n": [1, 2, 3]}
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1]
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0


def test_non_streaming_tool_use_and_result(model):
    resp, raw = _post(model, {"model": "m", "tools": TOOLS, "messages": [_user("[tool add]")]})
    msg = json.loads(raw)
    assert resp.status == 200 and msg["stop_reason"] == "tool_use"
    assert msg["content"][0] == {"type": "text", "text": "Calling add."}
    call = msg["content"][1]
    assert call == {"type": "tool_use", "id": call["id"], "name": "add", "input": {}}
    messages = [_user("[tool add]"), {"role": "assistant", "content": msg["content"]},
                _result(call["id"], "5")]
    _, raw = _post(model, {"model": "m", "tools": TOOLS, "messages": messages})
    msg = json.loads(raw)
    assert msg["stop_reason"] == "end_turn" and msg["content"] == [{"type": "text", "text": (
        'Offline model got from add: "5".\n'
        'Offline model heard: "[tool add]". Earlier questions: none.')}]


def test_markers_combine_with_fail_slow_pause_and_titles(model):
    resp, raw = _post(model, {"stream": True, "tools": TOOLS,
                              "messages": [_user("[fail] [tool echo]")]})
    assert resp.status == 400 and "requested failure" in raw

    model.slow_delay = 0.002
    try:
        _, raw = _post(model, {"stream": True, "tools": TOOLS,
                               "messages": [_user('[slow] [tool echo {"text": "slowly"}]')]})
    finally:
        model.slow_delay = 0.1
    deltas = [d["delta"] for n, d in anthropic_sse(raw) if n == "content_block_delta"]
    assert sum(d["type"] == "text_delta" for d in deltas) == 21  # len("Calling mcp__s__echo.")
    assert len(json.dumps({"text": "slowly"})) == 18  # one char a piece, after a first ""
    assert [d["partial_json"] for d in deltas if d["type"] == "input_json_delta"] == [
        "", *json.dumps({"text": "slowly"})]

    typed = "[pause 0.4] [tool echo]"
    t0 = time.monotonic()
    _, raw = _post(model, {"stream": True, "tools": TOOLS, "messages": [_user(typed)]})
    assert time.monotonic() - t0 >= 0.4
    call = next(d["content_block"] for n, d in anthropic_sse(raw)
                if n == "content_block_start" and d["index"] == 1)
    t0 = time.monotonic()  # the reply to the result does not pause again
    _, raw = _post(model, {"stream": True, "tools": TOOLS, "messages": [
        _user(typed), _called(call["id"], call["name"], {}), _result(call["id"], "r")]})
    assert time.monotonic() - t0 < 0.3  # expected ~20 ms; 0.4 s if it paused again
    text = "".join(d["delta"]["text"] for n, d in anthropic_sse(raw) if n == "content_block_delta")
    assert text == ('Offline model got from mcp__s__echo: "r".\n'
                    f'Offline model heard: "{typed}". Earlier questions: none.')

    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    resp, raw = _post(model, {"tools": TOOLS, "messages": [_user("[tool echo] x")],
                              "output_config": {"format": {"type": "json_schema",
                                                           "schema": schema}}})
    msg = json.loads(raw)
    assert msg["stop_reason"] == "end_turn" and [b["type"] for b in msg["content"]] == ["text"]
    assert json.loads(msg["content"][0]["text"]) == {
        "title": 'Offline model heard: "[tool echo] x". Earlier questions: none.'}


# --- real SDK + bundled CLI -----------------------------------------------------------------

sdk = pytest.importorskip("claude_agent_sdk")


def _probe_server(calls):
    @sdk.tool("echo", "Echo the text back", {"text": str})
    async def echo(args):
        calls.append(dict(args))
        return {"content": [{"type": "text", "text": f"echoed {args.get('text', '')}"}]}

    return sdk.create_sdk_mcp_server("probe", tools=[echo])


def _options(model, tmp_path, calls, **kw):
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    env = {"ANTHROPIC_BASE_URL": model.base_url, "ANTHROPIC_API_KEY": "sk-offline-test",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CONFIG_DIR": str(tmp_path / "cfg")}
    return sdk.ClaudeAgentOptions(env=env, cwd=str(tmp_path / "work"),
                                  system_prompt="You are a test.", tools=[],
                                  mcp_servers={"probe": _probe_server(calls)},
                                  max_turns=6, **kw)


async def _turn(client, prompt):
    """(assistant texts, tool_use blocks, tool_result blocks, result) of one turn."""
    texts, uses, results, final = [], [], [], None
    await client.query(prompt)
    async with asyncio.timeout(120):
        async for msg in client.receive_response():
            if isinstance(msg, sdk.AssistantMessage):
                texts += [b.text for b in msg.content if isinstance(b, sdk.TextBlock)]
                uses += [b for b in msg.content if isinstance(b, sdk.ToolUseBlock)]
            elif isinstance(msg, sdk.UserMessage) and isinstance(msg.content, list):
                results += [b for b in msg.content if isinstance(b, sdk.ToolResultBlock)]
            elif isinstance(msg, sdk.ResultMessage):
                final = msg
    return texts, uses, results, final


@pytest.mark.sdk
def test_sdk_allowed_tool_runs_once_and_is_quoted(model, tmp_path):
    calls = []
    typed = '[tool echo {"text": "cats"}] find cats'
    two = '[tool echo {"text": "one"}] [tool mcp__probe__echo {"text": "two"}] both'

    async def scenario():
        options = _options(model, tmp_path, calls, allowed_tools=["mcp__probe__echo"])
        async with sdk.ClaudeSDKClient(options) as client:
            texts, uses, results, final = await _turn(client, typed)
            assert calls == [{"text": "cats"}]
            assert [(u.name, u.input) for u in uses] == [("mcp__probe__echo", {"text": "cats"})]
            assert uses[0].id.startswith("toolu_offline_")
            assert [(r.tool_use_id, r.is_error) for r in results] == [(uses[0].id, None)]
            assert texts == ["Calling mcp__probe__echo.",
                             'Offline model got from mcp__probe__echo: "echoed cats".\n'
                             f'Offline model heard: "{typed}". Earlier questions: none.']
            assert final.is_error is False and final.stop_reason == "end_turn"
            assert final.num_turns == 2

            texts, uses, _, final = await _turn(client, two)
            assert calls[1:] == [{"text": "one"}, {"text": "two"}]
            assert [u.input for u in uses] == [{"text": "one"}, {"text": "two"}]
            assert texts == ["Calling mcp__probe__echo.",
                             'Offline model got from mcp__probe__echo: "echoed one".\n'
                             "Calling mcp__probe__echo.",
                             'Offline model got from mcp__probe__echo: "echoed two".\n'
                             f'Offline model heard: "{two}". Earlier questions: "{typed}".']

            texts, uses, _, final = await _turn(client, "[tool missing] and no tool")
            assert uses == [] and len(calls) == 3 and final.is_error is False
            assert texts == ["Offline model: no tool missing here.\n"
                             'Offline model heard: "[tool missing] and no tool". '
                             f'Earlier questions: "{typed}" | "{two}".']

            texts, _, _, _ = await _turn(client, "plain")  # a turn without markers: as ever
            assert texts == [reply_text([{"role": "user", "content": t}
                                         for t in (typed, two, "[tool missing] and no tool",
                                                   "plain")])]

    asyncio.run(scenario())


@pytest.mark.sdk
def test_sdk_denied_tool_never_runs_and_the_refusal_is_quoted(model, tmp_path):
    calls, asked = [], []

    async def deny(name, value, context):
        asked.append((name, value))
        return sdk.PermissionResultDeny(message="not in tests")

    typed = '[tool echo {"text": "secret"}] try it'

    async def scenario():
        # Not in allowed_tools, so the CLI asks can_use_tool, which denies.
        options = _options(model, tmp_path, calls, can_use_tool=deny)
        async with sdk.ClaudeSDKClient(options) as client:
            texts, uses, results, final = await _turn(client, typed)
        assert [(u.name, u.input) for u in uses] == [("mcp__probe__echo", {"text": "secret"})]
        assert [(r.tool_use_id, r.is_error) for r in results] == [(uses[0].id, True)]
        assert texts == ["Calling mcp__probe__echo.",
                         'Offline model was refused mcp__probe__echo: "not in tests".\n'
                         f'Offline model heard: "{typed}". Earlier questions: none.']
        assert final.is_error is False

    asyncio.run(scenario())
    assert asked == [("mcp__probe__echo", {"text": "secret"})]
    assert calls == []
