"""Offline stand-in for the Anthropic Messages API (stdlib only).

Lets the real Claude Code CLI (bundled in claude-agent-sdk) run complete
conversations with no network: start the server and give the CLI the env
``ANTHROPIC_BASE_URL=<base_url>``, any ``ANTHROPIC_API_KEY`` and
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` (tests also set
``CLAUDE_CONFIG_DIR`` to a temp dir).  Only the model endpoint is fake.

Endpoints: ``POST /v1/messages`` (SSE when ``"stream": true``, one JSON
message otherwise), ``POST /v1/messages/count_tokens`` -> ``{"input_tokens": N}``.
Any other path answers at once (GET -> ``{}``, others -> 404 error JSON) and is
recorded in ``OfflineModel.unknown``.  Query strings (``?beta=true``) are ignored.
HTTP/1.1 keep-alive: JSON has Content-Length, SSE uses chunked encoding.

Replies are deterministic and reveal the conversation that was sent.  Only
user-typed texts count: each text block of a role "user" message, skipping
``tool_result`` blocks and CLI-injected texts (``<system-reminder>``,
``<session>`` or any other ``<tag>``-prefixed text, ``[Request interrupted by user]``,
the CLI's ``Continue from where you left off.`` after a deferred tool call)::

    Offline model heard: "<last>". Earlier questions: "<first>" | "<second>".
    Offline model heard: "<last>". Earlier questions: none.

A person's message may carry images and documents (content blocks beside
its text, contract §11): the reply first says what the LAST one received, a
line per block (decoded with Pillow and pypdf, imported only then), then the
usual line (``""`` heard when the message had no text)::

    Offline model saw image/png 640x480
    Offline model saw document application/pdf, 3 pages
    Offline model saw text document "notes.md": Zanzibar trip budget: flights 900, hotel…

The CLI's own note beside such a block (``[Image: source: <path>]``) is not
the person's text.  Each quoted text is truncated to 200 chars.  Streamed replies arrive as ~6
word-split ``text_delta`` events.  Markers in the last user text:

* ``[tool NAME]`` or ``[tool NAME {"key": "value"}]`` -> a tool call.  NAME is
  matched against the request's ``tools`` by exact name, else as the end of
  ``mcp__<server>__NAME`` (so ``<server>__NAME`` picks a server); the input
  (a JSON object, default ``{}``) is passed as is.  A reply calling a tool has
  a text block ``Calling <tool>.`` then a ``tool_use`` block (id
  ``toolu_offline_<n>``, ``<tool>`` the full offered name; streamed as the API
  does: ``content_block_start`` with ``input: {}``, ``input_json_delta``
  chunks, ``content_block_stop``) and stop_reason ``tool_use``.  Several
  markers are called one per response, in order, each after the previous
  one's result came back.  The reply after a result quotes each
  ``tool_result`` sent back since the model's last answer::

      Offline model got from <tool>: "<result text>".
      Offline model was refused <tool>: "<result text>".

  (the second for ``is_error: true``: a denied call, whose text is the reason;
  a failed tool reads the same), then either ``Calling <next tool>.`` and its
  ``tool_use``, or, when no call is left, the usual ``Offline model heard: ...``
  line; lines are joined by newlines.  A marker naming no offered tool, or whose
  input is not a JSON object followed by ``]``, is not called; the turn's first
  reply says so in a line before the others::

      Offline model: no tool <NAME> here.
      Offline model: bad input for tool <NAME> (a JSON object, then ]).

  A turn starts at the last user message with typed text; only calls and
  results after it count (a result arriving with new typed text, e.g. after an
  interrupt, is not quoted).  A turn without markers replies exactly as before.
* ``[slow]`` -> 30 deltas, ``slow_delay`` (0.1 s) apart (interrupt / "busy" tests);
  in a tool turn every reply is slow (a ``tool_use`` input in up to 30 pieces);
* ``[pause N]`` -> N seconds (at most 60) of silence before the reply streams
  (a quiet turn: heartbeats, a person thinking); in a tool turn only before the
  first reply, not after tool results;
* ``[fail]`` -> HTTP 400 ``{"type":"error","error":{"type":
  "invalid_request_error","message":"offline model: requested failure"}}``
  (it wins over ``[tool ...]``: no tool is called).
  (The CLI retries a 400 with fewer betas/tools: one failed turn = 6 requests.)

Helpers give the exact lines: :func:`reply_text`, :func:`calling_text`,
:func:`result_text`, :func:`no_tool_text`, :func:`bad_tool_text`.

Requests with ``output_config.format`` of type ``json_schema`` (the CLI's
session-title side request) get a minimal JSON object fitting the schema,
strings filled with the reply (or ``"Offline session"`` if no user text); it
never calls tools.

Usage: ``m = start_offline_model(); ...; m.stop()`` or
``python -m chat_app.offline_model --port 8765``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_QUOTE = 200
FAIL_BODY = {"type": "error", "error": {"type": "invalid_request_error",
                                        "message": "offline model: requested failure"}}
_ids = itertools.count(1)


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


# CONTINUE: what the CLI sends when a session resumes after a deferred tool
# call (the call's result comes with it); not the person's words.
CONTINUE = "Continue from where you left off."
_META = re.compile(r"\s*(<[A-Za-z][\w-]*[\s>/]|\[Request interrupted by user|"
                   # where the CLI keeps a message's image or document (its own note)
                   r"\[(?:Image|Document)(?::| source:)|"
                   + re.escape(CONTINUE) + r"\s*$)")


def _is_meta(text: str) -> bool:
    """CLI-injected text: ``<system-reminder>``, ``<command-name>``, interrupt notes, ..."""
    return bool(_META.match(text))


def user_texts(messages: list) -> list[str]:
    """User-typed texts of a Messages API ``messages`` list, one per text block, in order."""
    out = []
    for msg in messages or []:
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "text":
                text = (block.get("text") or "").strip()
                if text and not _is_meta(text):
                    out.append(text)
    return out


ATTACHMENT_BLOCKS = ("image", "document")
FIRST_WORDS = 8


def attachment_blocks(msg: dict) -> list[dict]:
    """A user message's own image and document blocks (not those inside a tool's result)."""
    if msg.get("role") != "user":
        return []
    return [b for b in _blocks(msg) if b.get("type") in ATTACHMENT_BLOCKS]


def _is_input(msg: dict) -> bool:
    """A message the person sent: typed text, or attachments."""
    return _has_typed_text(msg) or bool(attachment_blocks(msg))


def last_input(messages: list) -> dict | None:
    return next((m for m in reversed(messages or []) if isinstance(m, dict) and _is_input(m)), None)


def last_text(messages: list) -> str:
    """The typed text of the person's last message (markers are read there)."""
    msg = last_input(messages)
    texts = user_texts([msg]) if msg is not None else []
    return texts[-1] if texts else ""


def describe(block: dict) -> str:
    """What an image or document block holds, as the offline model says it:
    ``image/png 640x480``, ``document application/pdf, 3 pages``,
    ``text document "notes.md": <its first words>…``."""
    import base64
    import io

    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    media_type = source.get("media_type") or "?"
    try:
        if source.get("type") == "text":
            words = str(source.get("data") or "").split()
            first = " ".join(words[:FIRST_WORDS]) + ("…" if len(words) > FIRST_WORDS else "")
            return f'text document "{block.get("title") or ""}": {first}'
        data = base64.b64decode(source.get("data") or "", validate=True)
        if block.get("type") == "image":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                return f"{media_type} {image.width}x{image.height}"
        from pypdf import PdfReader

        pages = len(PdfReader(io.BytesIO(data)).pages)
        return f"document {media_type}, {pages} page{'s' if pages != 1 else ''}"
    except Exception as exc:  # noqa: BLE001 (any undecodable block is reported, never fatal)
        return f"{block.get('type')} {media_type} that it could not read ({type(exc).__name__})"


def saw_lines(messages: list) -> list[str]:
    """One line per attachment of the person's last message."""
    msg = last_input(messages)
    return [f"Offline model saw {describe(b)}" for b in attachment_blocks(msg)] if msg else []


def _quote(text: str) -> str:
    return '"' + text[:MAX_QUOTE] + '"'


def reply_text(messages: list) -> str:
    texts = user_texts(messages) or [""]
    msg = last_input(messages)
    if msg is not None and not _has_typed_text(msg):  # attachments alone: nothing heard
        texts = [*user_texts(messages), ""]
    earlier = " | ".join(_quote(t) for t in texts[:-1]) or "none"
    return f"Offline model heard: {_quote(texts[-1])}. Earlier questions: {earlier}."


TOOL_MARKER = re.compile(r"\[tool\s+([A-Za-z0-9_.:-]+)\s*")


def tool_markers(text: str) -> list[tuple[str, dict | None]]:
    """``[tool NAME]`` / ``[tool NAME {json}]`` markers of ``text``, in order, as
    ``(name, input)``; ``input`` is ``None`` when it is not a JSON object followed by ``]``."""
    out, pos, decoder = [], 0, json.JSONDecoder()
    while m := TOOL_MARKER.search(text, pos):
        name, pos, value = m[1], m.end(), {}
        if text[pos:pos + 1] != "]":
            try:
                value, pos = decoder.raw_decode(text, pos)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                value = None
            while text[pos:pos + 1].isspace():
                pos += 1
            if text[pos:pos + 1] != "]":
                value = None
        out.append((name, value))
    return out


def find_tool(name: str, tools: list) -> str | None:
    """The offered tool called ``name``, or ``mcp__<server>__<name>``; ``None`` if absent."""
    names = [t.get("name") for t in tools or [] if isinstance(t, dict) and t.get("name")]
    if name in names:
        return name
    return next((n for n in names if n.startswith("mcp__") and n.endswith("__" + name)), None)


def calling_text(name: str) -> str:
    return f"Calling {name}."


def result_text(name: str, result: str, is_error: bool = False) -> str:
    verb = "was refused" if is_error else "got from"
    return f"Offline model {verb} {name}: {_quote(result)}."


def no_tool_text(name: str) -> str:
    return f"Offline model: no tool {name} here."


def bad_tool_text(name: str) -> str:
    return f"Offline model: bad input for tool {name} (a JSON object, then ])."


def _blocks(msg: dict) -> list:
    content = msg.get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _has_typed_text(msg: dict) -> bool:
    return msg.get("role") == "user" and bool(user_texts([msg]))


def _turn(messages: list) -> list:
    """The messages after the person's last one (typed text or attachments: this turn's tool traffic)."""
    start = max((i for i, m in enumerate(messages) if _is_input(m)), default=-1)
    return messages[start + 1:]


def first_of_turn(messages: list) -> bool:
    """True unless the model already answered since the last user-typed text."""
    return not any(m.get("role") == "assistant" for m in _turn(messages))


def _result_content(block: dict) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, dict):
            parts.append(part.get("text", "") if part.get("type") == "text"
                         else f"[{part.get('type', 'block')}]")
    return "\n".join(parts)


def answer(body: dict) -> list[dict]:
    """The content blocks of the reply to a Messages API request (see the module docstring).

    A turn starts at the person's last message (typed text or attachments).  The markers of its
    last typed text are worked through one per response: each offered tool is called (a text block, then a
    ``tool_use``); once every call's result is back, the reply ends with :func:`reply_text`."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    after = _turn(messages)
    names = {b.get("id"): b.get("name") for m in messages if m.get("role") == "assistant"
             for b in _blocks(m) if b.get("type") == "tool_use"}
    answered = [i for i, m in enumerate(after) if m.get("role") == "assistant"]
    done = sum(b.get("type") == "tool_use" for i in answered for b in _blocks(after[i]))
    lines = []
    for m in after[answered[-1] + 1:] if answered else []:  # results since the last answer
        for b in _blocks(m):
            if m.get("role") == "user" and b.get("type") == "tool_result":
                lines.append(result_text(names.get(b.get("tool_use_id")) or "tool",
                                         _result_content(b), bool(b.get("is_error"))))
    calls = []
    for name, value in tool_markers(last_text(messages)):
        found = find_tool(name, body.get("tools"))
        if found and value is not None:
            calls.append((found, value))
        elif done == 0:
            lines.append(no_tool_text(name) if not found else bad_tool_text(name))
    if done < len(calls):
        name, value = calls[done]
        lines.append(calling_text(name))
        return [{"type": "text", "text": "\n".join(lines)},
                {"type": "tool_use", "id": f"toolu_offline_{next(_ids)}", "name": name,
                 "input": value}]
    lines += saw_lines(messages)
    lines.append(reply_text(messages))
    return [{"type": "text", "text": "\n".join(lines)}]


def _output_tokens(blocks: list[dict]) -> int:
    return _tokens("".join(b.get("text") or json.dumps(b.get("input", "")) for b in blocks))


def _chunks(text: str, n: int, by_words: bool = True) -> list[str]:
    """Split ``text`` losslessly into about ``n`` pieces (on word boundaries, or by chars)."""
    if not by_words:
        n = max(1, min(n, len(text)))
        cuts = [len(text) * i // n for i in range(n + 1)]
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]
    words = text.split(" ")
    size = max(1, -(-len(words) // n))
    parts = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p + " " for p in parts[:-1]] + parts[-1:]


def _fill(schema: dict, text: str):
    """A minimal value matching a JSON schema (for ``output_config.format`` requests)."""
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: _fill(props.get(k, {}), text) for k in schema.get("required", props)}
    return {"string": text, "number": 0, "integer": 0, "boolean": False,
            "array": [], "null": None}.get(kind, text)


def _input_tokens(body: dict) -> int:
    return _tokens(json.dumps(body.get("messages", [])) + json.dumps(body.get("system", "")))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Content-Length or chunked on every response
    disable_nagle_algorithm = True  # else each small write waits ~40 ms for a delayed ACK
    server: "_Server"

    def log_message(self, fmt, *args):  # quiet
        if self.server.model.verbose:
            super().log_message(fmt, *args)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return {}

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_offline_{next(_ids)}")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.model.unknown.append(("GET", self.path))
        self._json(200, {})

    def _not_found(self):
        self._body()  # consume it so the keep-alive connection stays in sync
        self.server.model.unknown.append((self.command, self.path))
        self._json(404, {"type": "error", "error": {
            "type": "not_found_error", "message": f"offline model: no {self.path}"}})

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_found

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._body()
        model = self.server.model
        if path == "/v1/messages/count_tokens":
            return self._json(200, {"input_tokens": _input_tokens(body)})
        if path != "/v1/messages":
            model.unknown.append(("POST", self.path))
            return self._json(404, {"type": "error", "error": {
                "type": "not_found_error", "message": f"offline model: no {self.path}"}})
        with model.lock:
            model.requests.append(body)
        texts = user_texts(body.get("messages", []))
        last = last_text(body.get("messages", []))
        if "[fail]" in last:
            return self._json(400, FAIL_BODY)
        fmt = (body.get("output_config") or {}).get("format") or {}
        if fmt.get("type") == "json_schema":  # e.g. the CLI's session-title side request
            title = reply_text(body.get("messages", [])) if texts else "Offline session"
            blocks = [{"type": "text", "text": json.dumps(_fill(fmt.get("schema") or {}, title))}]
        else:
            blocks = answer(body)
        stop_reason = "tool_use" if blocks[-1]["type"] == "tool_use" else "end_turn"
        msg = {"id": f"msg_offline_{next(_ids)}", "type": "message", "role": "assistant",
               "model": body.get("model", "offline-model"), "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": _input_tokens(body), "output_tokens": 1,
                         "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        if not body.get("stream"):
            msg["content"] = blocks
            msg["stop_reason"] = stop_reason
            msg["usage"]["output_tokens"] = _output_tokens(blocks)
            return self._json(200, msg)
        pause = PAUSE.search(last)
        if pause and fmt.get("type") != "json_schema" and first_of_turn(body.get("messages", [])):
            time.sleep(min(float(pause[1]), 60.0))
        slow = "[slow]" in last
        self._stream(msg, blocks, stop_reason, slow, model.slow_delay if slow else 0.0)

    def _stream(self, msg: dict, blocks: list[dict], stop_reason: str,
                slow: bool, delay: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")  # keeps the connection reusable
        self.send_header("request-id", f"req_offline_{next(_ids)}")
        self.end_headers()

        def event(name: str, data: dict) -> None:
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

        def deltas(index: int, pieces: list[str], kind: str, key: str) -> None:
            for i, piece in enumerate(pieces):
                if delay and i:
                    time.sleep(delay)
                event("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": kind, key: piece}})

        try:
            event("message_start", {"type": "message_start", "message": msg})
            for index, block in enumerate(blocks):
                if block["type"] == "text":
                    text = block["text"]
                    pieces = _chunks(text, 30, by_words=False) if slow else _chunks(text, 6)
                    event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "text", "text": ""}})
                    if index == 0:
                        event("ping", {"type": "ping"})
                    deltas(index, pieces, "text_delta", "text")
                else:  # tool_use: input {} at the start, then the JSON in partial chunks
                    event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {**block, "input": {}}})
                    if index == 0:
                        event("ping", {"type": "ping"})
                    raw = json.dumps(block["input"])
                    deltas(index, [""] + _chunks(raw, 30 if slow else 3, by_words=False),
                           "input_json_delta", "partial_json")
                event("content_block_stop", {"type": "content_block_stop", "index": index})
            event("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                    "usage": {"output_tokens": _output_tokens(blocks)}})
            event("message_stop", {"type": "message_stop"})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # BrokenPipe / ConnectionReset
            self.close_connection = True  # client went away (e.g. interrupted turn)


PAUSE = re.compile(r"\[pause (\d{1,2}(?:\.\d{1,3})?)\]")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    model: "OfflineModel"


class OfflineModel:
    """A running offline server; see :func:`start_offline_model`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.requests: list[dict] = []        # bodies of POST /v1/messages, in order
        self.unknown: list[tuple[str, str]] = []  # (method, path) of unhandled requests
        self.lock = threading.Lock()
        self.verbose = verbose
        self.slow_delay = 0.1                 # seconds between deltas for [slow]
        self.httpd = _Server((host, port), _Handler)
        self.httpd.model = self
        self.host, self.port = self.httpd.server_address[:2]
        self.base_url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name=f"offline-model-{self.port}")

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_offline_model(host: str = "127.0.0.1", port: int = 0) -> OfflineModel:
    model = OfflineModel(host, port)
    model.thread.start()
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Offline Anthropic Messages API stand-in.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    model = OfflineModel(args.host, args.port, verbose=args.verbose)
    print(f"Offline model listening on {model.base_url}", flush=True)
    try:
        model.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        model.httpd.server_close()


if __name__ == "__main__":
    main()
