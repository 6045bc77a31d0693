"""SDK messages to the contract's stream events (§5)."""

import dataclasses
import datetime
import enum
from pathlib import PurePath

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
)


def to_json(value):
    """A faithful JSON form of SDK objects: dataclasses become objects whose
    ``kind`` names their class, with every field; other values pass through."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"kind": type(value).__name__}
        for field in dataclasses.fields(value):
            out[field.name] = to_json(getattr(value, field.name))
        return out
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(v) for v in value]
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, PurePath):
        return str(value)
    return repr(value)


def session_event(thread_id: str, resource_id: str, session_id: str, resumed: bool,
                  forked_from: str | None, notice: str | None = None) -> dict:
    event = {
        "type": "session",
        "threadId": thread_id,
        "resourceId": resource_id,
        "sessionId": session_id,
        "resumed": resumed,
        "forkedFromThreadId": forked_from,
    }
    if notice:
        event["notice"] = notice
    return event


# What a client never sees of the CLI's system messages (contract §5: server
# paths and the API key's source left out): where the server keeps its
# files, and how it authenticates to the model.
PRIVATE_SYSTEM_KEYS = frozenset({
    "cwd", "original_cwd", "additional_directories", "memory_paths", "messaging_socket_path",
    "apiKeySource",
})


def _server_paths() -> tuple[str, ...]:
    from django.conf import settings

    return tuple(str(p) for p in (settings.OMNI_WORKSPACE_DIR, settings.CLAUDE_CONFIG_DIR,
                                  settings.DATA_DIR, settings.BASE_DIR) if p)


def _redacted(value, paths: tuple[str, ...]):
    """``value`` without strings that name a server path (dropped from dicts and lists)."""
    if isinstance(value, dict):
        return {k: _redacted(v, paths) for k, v in value.items()
                if k not in PRIVATE_SYSTEM_KEYS and not _private(v, paths)}
    if isinstance(value, list):
        return [_redacted(v, paths) for v in value if not _private(v, paths)]
    return value


def _private(value, paths) -> bool:
    return isinstance(value, str) and value.startswith(paths)


def chunk_event(session_id: str, message) -> dict:
    chunk = to_json(message)
    if isinstance(message, SystemMessage) and isinstance(chunk.get("data"), dict):
        chunk["data"] = _redacted(chunk["data"], _server_paths())
    return {"type": "chunk", "sessionId": session_id, "chunk": chunk}


def text_event(session_id: str, text: str) -> dict:
    return {"type": "text", "sessionId": session_id, "text": text}


TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def usage_of(result: ResultMessage) -> dict:
    """The four token counts of a result (the CLI reports them per turn)."""
    usage = result.usage or {}
    return {kind: int(usage.get(kind) or 0) for kind in TOKEN_KINDS}


def done_event(session_id: str, result: ResultMessage, *, cost_usd: float | None = None,
               usage: dict | None = None, duration_ms: int | None = None) -> dict:
    """``done``: the turn's own cost and usage (a warm Claude process's
    ``total_cost_usd`` runs on across its turns: the caller passes the
    difference)."""
    return {
        "type": "done",
        "sessionId": session_id,
        "result": {
            "durationMs": duration_ms if duration_ms is not None else result.duration_ms,
            "costUsd": cost_usd if cost_usd is not None else result.total_cost_usd,
            "numTurns": result.num_turns,
            "isError": result.is_error,
            "usage": usage if usage is not None else usage_of(result),
        },
    }


def tool_use_event(block) -> dict:
    return {"type": "tool_use", "toolUseId": block.id, "tool": block.name, "input": to_json(block.input)}


def text_of(content) -> str:
    """A tool result's text (MCP content blocks, or a string)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                parts.append(block.get("text") if block.get("type") == "text" else f"[{block.get('type')}]")
            else:
                parts.append(str(block))
        return "\n".join(p for p in parts if p)
    return "" if content is None else str(content)


def tool_result_event(block) -> dict:
    return {"type": "tool_result", "toolUseId": block.tool_use_id, "isError": bool(block.is_error),
            "text": text_of(block.content)}


def approval_request_event(call) -> dict:
    import json

    return {"type": "approval_request", "approvalId": call.approval_id, "toolUseId": call.tool_use_id,
            "tool": call.tool, "input": json.loads(call.input or "{}"),
            "expiresAt": iso(call.expires_at)}


def approval_event(call) -> dict:
    return {"type": "approval", "approvalId": call.approval_id, "decision": call.decision,
            "by": call.decided_by}


def iso(when) -> str | None:
    if when is None:
        return None
    return when.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_event(code: str, message: str, retry_after: int | None = None) -> dict:
    event = {"type": "error", "code": code, "message": message}
    if retry_after is not None:  # 429 / 503: when to try again, in seconds
        event["retryAfter"] = retry_after
    return event


def init_session_id(message) -> str | None:
    """The session id the CLI reports in its ``init`` system message."""
    if isinstance(message, SystemMessage) and message.subtype == "init":
        return message.data.get("session_id")
    return None


def init_model(message) -> str | None:
    """The model the CLI reports in its ``init`` system message."""
    if isinstance(message, SystemMessage) and message.subtype == "init":
        return message.data.get("model")
    return None


def text_delta(message) -> str | None:
    """The text of a streamed ``text_delta`` (``include_partial_messages``)."""
    if isinstance(message, StreamEvent) and message.parent_tool_use_id is None:
        event = message.event
        if event.get("type") == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return delta.get("text") or None
    return None


def stream_message_id(message) -> str | None:
    """The API message id a ``message_start`` stream event announces."""
    if isinstance(message, StreamEvent) and message.event.get("type") == "message_start":
        return (message.event.get("message") or {}).get("id")
    return None


def assistant_text(message) -> str:
    if isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
        return "".join(b.text for b in message.content if isinstance(b, TextBlock))
    return ""
