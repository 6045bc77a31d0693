"""The built-in tools of contract §9, on the ``smart`` preset.

Each looks threads up within ``caller.resource_id`` only: a thread id of
another resource is "no such conversation", exactly like one that does not
exist, whatever the model asks for.
"""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async

from sessions_app import selectors, services, transcripts
from sessions_app.attachments import services as attachments
from sessions_app.errors import NotFound

from . import Caller, omni_tool

SEARCH_LIMIT = 10
SNIPPET_CHARS = 160


def _snippet(text: str, query: str) -> str:
    text = " ".join(text.split())
    at = text.lower().find(query.lower())
    if at < 0:
        return text[:SNIPPET_CHARS]
    start = max(0, at - SNIPPET_CHARS // 3)
    piece = text[start:start + SNIPPET_CHARS]
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(text) else "")


def _search(resource_id: str, query: str, current: str) -> list[dict]:
    # the caller's own threads but the one asking (its title is the question)
    found = selectors.search_sync(resource_id, query, exclude_thread=current, limit=SEARCH_LIMIT)
    return [{"threadId": m.thread_id, "title": m.title, "snippet": _snippet(where, query)} for m, where in found]


@omni_tool(
    "search_conversations",
    "Search the user's own other conversations by words in their titles or messages. "
    "Returns up to 10 matches: threadId, title and a snippet.",
    {"type": "object", "properties": {"query": {"type": "string", "description": "words to look for"}},
     "required": ["query"]},
)
async def search_conversations(args: dict, caller: Caller) -> str:
    query = str(args.get("query") or "").strip()[:200]
    if not query:
        return json.dumps({"error": "query is empty"})
    return json.dumps({"matches": await sync_to_async(_search)(caller.resource_id, query, caller.thread_id)})


@omni_tool(
    "read_conversation",
    "Read one of the user's own conversations: its messages in order.",
    {"type": "object", "properties": {"threadId": {"type": "string"}}, "required": ["threadId"]},
)
async def read_conversation(args: dict, caller: Caller) -> str:
    thread = str(args.get("threadId") or "")
    mapping = await selectors.get_mapping(thread, caller.resource_id)
    if mapping is None:
        return json.dumps({"error": f"no conversation {thread!r}"})
    messages = await transcripts.session_messages(mapping.session_id)
    if any("attachments" in m for m in messages):
        await sync_to_async(attachments.name_messages_sync)(caller.resource_id, messages)
    return json.dumps({"threadId": thread, "title": mapping.title,
                       "messages": [_message(m) for m in messages]})


def _message(message: dict) -> dict:
    """A message as the tool tells it: its text, and its attachments by name
    and type (never their bytes)."""
    told = {"role": message["role"], "text": message["text"]}
    if message.get("attachments"):
        told["attachments"] = [{"name": a["name"], "mediaType": a["mediaType"]}
                               for a in message["attachments"]]
    return told


@omni_tool(
    "delete_conversation",
    "Delete one of the user's own conversations for good (asks the user first).",
    {"type": "object", "properties": {"threadId": {"type": "string"}}, "required": ["threadId"]},
    needs_approval=True,
)
async def delete_conversation(args: dict, caller: Caller) -> str:
    thread = str(args.get("threadId") or "")
    try:
        await services.delete_session(thread, caller.resource_id)
    except NotFound:
        return json.dumps({"error": f"no conversation {thread!r}"})
    return json.dumps({"deleted": thread})
