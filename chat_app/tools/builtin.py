"""The built-in tools of contract §9, on the ``smart`` preset.

Each looks threads up within ``caller.resource_id`` only: a thread id of
another resource is "no such conversation", exactly like one that does not
exist, whatever the model asks for.
"""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.db.models import Q

from sessions_app import services, transcripts
from sessions_app.errors import NotFound
from sessions_app.models import SessionMapping, TranscriptEntry

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
    mappings = SessionMapping.objects.filter(resource_id=resource_id).exclude(thread_id=current)
    by_title = list(mappings.filter(Q(title__icontains=query) | Q(last_message__icontains=query))
                    .order_by("-updated_at")[:SEARCH_LIMIT])
    found = {m.thread_id: m for m in by_title}
    snippets = {m.thread_id: _snippet(m.title if query.lower() in m.title.lower() else m.last_message, query)
                for m in by_title}
    if len(found) < SEARCH_LIMIT:
        sessions = dict(mappings.values_list("session_id", "thread_id"))
        hits = (TranscriptEntry.objects.filter(session_id__in=list(sessions), data__icontains=query)
                .values_list("session_id", flat=True).distinct())
        for session_id in hits:
            thread = sessions[session_id]
            if thread in found:
                continue
            mapping = mappings.filter(thread_id=thread).first()
            if mapping is None:
                continue
            text = next((m["text"] for m in transcripts.transcript_messages(
                transcripts.main_transcript(session_id)) if query.lower() in m["text"].lower()), None)
            if text is None:
                continue  # the words were in the transcript's machinery, not in a message
            found[thread], snippets[thread] = mapping, _snippet(text, query)
            if len(found) >= SEARCH_LIMIT:
                break
    return [{"threadId": t, "title": m.title, "snippet": snippets[t]} for t, m in found.items()]


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
    mapping = await services.get_mapping(thread, caller.resource_id)
    if mapping is None:
        return json.dumps({"error": f"no conversation {thread!r}"})
    messages = await transcripts.session_messages(mapping.session_id)
    return json.dumps({"threadId": thread, "title": mapping.title,
                       "messages": [{"role": m["role"], "text": m["text"]} for m in messages]})


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
