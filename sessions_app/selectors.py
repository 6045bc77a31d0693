"""Reads of threads: the one module that reads mappings for the rest of the
project (REST views, the chat pipeline, the tools, the pool's janitor).
Writes and deletes are :mod:`sessions_app.services`'.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q

from . import sql
from .errors import BadRequest, NotFound
from .models import SessionMapping, TranscriptEntry, TurnRecord

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass
class Page:
    sessions: list[SessionMapping]
    next_cursor: str | None


def encode_cursor(mapping: SessionMapping) -> str:
    raw = f"{mapping.updated_at.isoformat()}|{mapping.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, pk = raw.rsplit("|", 1)
        when = datetime.fromisoformat(stamp)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        return when, int(pk)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("cursor is not valid") from exc


async def get_mapping(thread_id: str, resource_id: str) -> SessionMapping | None:
    return await SessionMapping.objects.filter(
        thread_id=thread_id, resource_id=resource_id
    ).afirst()


async def get_session_id(thread_id: str, resource_id: str) -> str | None:
    mapping = await get_mapping(thread_id, resource_id)
    return mapping.session_id if mapping else None


async def get_metadata(thread_id: str, resource_id: str) -> SessionMapping:
    mapping = await get_mapping(thread_id, resource_id)
    if mapping is None:
        raise NotFound(f"no thread {thread_id!r} for resource {resource_id!r}")
    return mapping


async def list_sessions(
    resource_id: str, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> Page:
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    query = SessionMapping.objects.filter(resource_id=resource_id).order_by("-updated_at", "-id")
    if cursor:
        when, pk = decode_cursor(cursor)
        query = query.filter(Q(updated_at__lt=when) | Q(updated_at=when, id__lt=pk))
    rows = [m async for m in query[: limit + 1]]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1]) if more else None)


@dataclass(frozen=True)
class TurnMapping:
    """What a turn reads of its thread's mapping before it starts."""

    session_id: str
    forked_from_thread_id: str | None
    version: int
    agent: str
    pending_approval_id: str | None


_TURN_MAPPING_FIELDS = [field.name for field in dataclasses.fields(TurnMapping)]


def turn_mapping_sync(thread_id: str, resource_id: str) -> TurnMapping | None:
    """The thread's mapping as a turn needs it, or None: one ``SELECT`` of
    five columns in plain SQL (see :func:`finish_turn_sync`)."""
    row = sql.mapping_for_turn(thread_id=thread_id, resource_id=resource_id, fields=_TURN_MAPPING_FIELDS)
    return None if row is None else TurnMapping(*row)


def turn_mapping_and_budget_sync(thread_id: str, resource_id: str, also=None):
    """A message's reads in one ``SELECT`` (every message's, the warm path):
    the thread's mapping as :func:`turn_mapping_sync` gives it, and the
    resource's budget state for :func:`sessions_app.usage.check_budget_sync`;
    with ``also`` (``also(connection) -> (expression, parameters)``) the
    expression's value as a third item."""
    from . import usage

    row, budget, value = sql.mapping_and_budget(
        thread_id=thread_id, resource_id=resource_id, fields=_TURN_MAPPING_FIELDS,
        day=usage.today(), default_caps=usage.default_caps(), also=also)
    mapping = None if row is None else TurnMapping(*row)
    return (mapping, budget) if also is None else (mapping, budget, value)


def current_sessions_sync(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``(resource_id, thread_id) -> session_id`` of the threads of ``keys``
    that still exist: one query."""
    wanted = set(keys)
    rows = SessionMapping.objects.filter(thread_id__in={thread for _, thread in keys}).values_list(
        "resource_id", "thread_id", "session_id")
    return {(resource, thread): session for resource, thread, session in rows
            if (resource, thread) in wanted}


def waiting_for_decision_sync(keys) -> set[tuple[str, str]]:
    """Those of the ``(resource_id, thread_id)`` pairs whose thread's tool
    call waits for a decision (or for its continuation): one query."""
    wanted = set(keys)
    if not wanted:
        return set()
    rows = SessionMapping.objects.filter(
        thread_id__in={thread for _, thread in wanted}, pending_approval_id__isnull=False,
    ).exclude(pending_approval_id="").values_list("resource_id", "thread_id")
    return {key for key in rows if key in wanted}


def turn_recorded_sync(turn_id: str) -> bool:
    """Whether the turn's record is stored: its last save went through (a
    retried save whose first commit was lost with its connection asks)."""
    return TurnRecord.objects.filter(turn_id=turn_id).exists()


def mapping_of(resource_ref, thread_ref):
    """The mappings of a (resource, thread) pair given as expressions (for
    ``Exists(...)`` in another model's query, e.g. ``OuterRef``)."""
    return SessionMapping.objects.filter(resource_id=resource_ref, thread_id=thread_ref)


def search_sync(resource_id: str, query: str, *, exclude_thread: str, limit: int) -> list[tuple]:
    """The resource's threads (but ``exclude_thread``) whose title, last
    message or transcript holds ``query``: ``(mapping, where)`` pairs, best
    first, ``where`` the text it was found in (``None``: only in the
    transcript, the caller finds the message)."""
    from . import transcripts

    mappings = SessionMapping.objects.filter(resource_id=resource_id).exclude(thread_id=exclude_thread)
    by_title = list(mappings.filter(Q(title__icontains=query) | Q(last_message__icontains=query))
                    .order_by("-updated_at")[:limit])
    found = {m.thread_id: (m, m.title if query.lower() in m.title.lower() else m.last_message)
             for m in by_title}
    if len(found) < limit:
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
                transcripts.main_transcript(session_id), attachments=False) if query.lower() in m["text"].lower()), None)
            if text is None:
                continue  # the words were in the transcript's machinery, not in a message
            found[thread] = (mapping, text)
            if len(found) >= limit:
                break
    return list(found.values())

