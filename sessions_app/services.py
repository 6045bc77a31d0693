"""The session service: the writes and deletes of mappings.

REST views, admin actions, the chat pipeline and management commands all
call it (sync callers wrap the coroutines with ``async_to_sync``); a turn's
record and cost are written with its last save (:func:`finish_turn_sync`).
Reads of a thread are :mod:`sessions_app.selectors`'.
"""

import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, router, transaction

from .errors import ApiError, Conflict
from .models import SessionMapping
from .outages import reconnecting
from .signals import thread_deleted
from . import selectors, sql

log = logging.getLogger("omni.chat")

TITLE_CHARS = 80
PREVIEW_CHARS = 200


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class EraseFailed(ApiError):
    status, code = 503, "erase_failed"


class ThreadDeleted(ApiError):
    """A turn's save found its thread deleted meanwhile: nothing is written."""

    status, code = 409, "thread_deleted"


async def save_session(
    thread_id: str,
    resource_id: str,
    session_id: str,
    *,
    agent: str | None = None,
    user_message: str | None = None,
    assistant_message: str | None = None,
    forked_from_thread_id: str | None = None,
    create: bool = True,
) -> SessionMapping:
    """Save or update a mapping after a turn.

    ``create=False``: update only. A turn passes it for every save but the
    first one of a new thread, so a thread deleted while its turn ran stays
    deleted: the save raises :class:`ThreadDeleted` instead of inserting.
    (A turn's record and cost go with its last save: :func:`finish_turn_sync`.)

    The title comes from the thread's first user message; ``last_message``
    previews the latest message; ``message_count`` counts user and assistant
    messages; ``version`` grows on every update (warm clients' staleness).
    One trip to the database thread (a turn saves twice).
    """
    # On a usable connection: a turn saves on the database thread, outside
    # any request, where nothing else replaces one the database dropped.
    mapping = await sync_to_async(reconnecting)(
        _save_session, thread_id, resource_id, session_id, agent, user_message, assistant_message,
        forked_from_thread_id, create,
    )
    log.info(
        "[CHAT] Saved session mapping thread=%s resource=%s session=%s",
        thread_id, resource_id, session_id,
    )
    return mapping


def _save_session(thread_id, resource_id, session_id, agent, user_message, assistant_message,
                  forked_from_thread_id, create) -> SessionMapping:
    mapping = SessionMapping.objects.filter(thread_id=thread_id, resource_id=resource_id).first()
    if mapping is None and not create:
        raise ThreadDeleted(f"thread {thread_id!r} was deleted while its turn ran")
    if mapping is None:
        return _create_mapping(thread_id, resource_id, session_id, agent, user_message,
                               assistant_message, forked_from_thread_id)
    # An existing thread: the same update as a turn's last save.
    _update_mapping(thread_id, resource_id, session_id, agent=agent, user_message=user_message,
                    assistant_message=assistant_message, turn_record=None)
    mapping.refresh_from_db()
    return mapping


def _create_mapping(thread_id, resource_id, session_id, agent, user_message, assistant_message,
                    forked_from_thread_id) -> SessionMapping:
    added = (user_message is not None) + bool(assistant_message)
    preview = assistant_message or user_message
    mapping = SessionMapping(
        thread_id=thread_id,
        resource_id=resource_id,
        session_id=session_id,
        agent=agent or "smart",
        title=_clip(user_message or "", TITLE_CHARS),
        last_message=_clip(preview or "", PREVIEW_CHARS),
        message_count=added,
        forked_from_thread_id=forked_from_thread_id,
    )
    try:
        mapping.save(force_insert=True)
    except IntegrityError as exc:
        raise Conflict(f"thread {thread_id!r} already exists", code="thread_exists") from exc
    return mapping


def _update_mapping(thread_id: str, resource_id: str, session_id: str, *, agent: str | None,
                    user_message: str | None, assistant_message: str | None,
                    turn_record: dict | None) -> None:
    """The one update of an existing mapping after a turn (its last save, or
    :func:`save_session` of a thread that exists), with the turn's record:
    the record first (``ON CONFLICT DO NOTHING``), then the mapping, its cost
    added only if the record was inserted now: a retried finish writes one
    record and counts its cost once. One transaction (the caller's, if any),
    two statements."""
    from .usage import record_fields

    added = (user_message is not None) + bool(assistant_message)
    preview = assistant_message or user_message
    record = record_fields(turn_record) if turn_record is not None else None
    with transaction.atomic(using=router.db_for_write(SessionMapping), savepoint=False):
        counted = record is not None and sql.turn_record_insert(record)
        if not sql.mapping_turn_update(
                thread_id=thread_id, resource_id=resource_id, session_id=session_id, added=added,
                agent=agent or None,
                last_message=_clip(preview, PREVIEW_CHARS) if preview else None,
                title=_clip(user_message, TITLE_CHARS) if user_message else None,
                cost_usd=record["cost_usd"] if counted else None):
            # the record goes too (the transaction rolls back)
            raise ThreadDeleted(f"thread {thread_id!r} was deleted while its turn ran")


def finish_turn_sync(thread_id: str, resource_id: str, session_id: str, *, agent: str | None = None,
                     user_message: str | None = None, assistant_message: str | None = None,
                     turn_record: dict | None = None) -> None:
    """A turn's last write of its mapping (update only: raises
    :class:`ThreadDeleted` if the thread is gone) with its record
    (:mod:`sessions_app.usage`) and cost: two statements, no read
    (:func:`_update_mapping`).

    Plain SQL, not the ORM: this runs once a turn on the warm path, where
    building the ORM's queries cost more CPU (~0.8 ms) than running them.
    The statements are what the ORM would send (``F()`` increments, the
    title set only while empty, the record inserted once per turn)."""
    _update_mapping(thread_id, resource_id, session_id, agent=agent, user_message=user_message,
                    assistant_message=assistant_message, turn_record=turn_record)
    log.info(
        "[CHAT] Saved session mapping thread=%s resource=%s session=%s",
        thread_id, resource_id, session_id,
    )


async def add_approvals(mapping: SessionMapping, messages: list[dict]) -> None:
    """Put each tool call's decision (from the audit) into ``messages``'
    ``toolCalls``: ``{"decision", "by"}``, or for a call that still waits
    ``{"decision": None, "by": None, "approvalId", "expiresAt"}``."""
    wanted = {call["toolUseId"]: call for m in messages for call in m.get("toolCalls", ())}
    if not wanted:
        return
    from .models import ToolCall
    from .schemas import iso_z

    rows = ToolCall.objects.filter(mapping=mapping, tool_use_id__in=list(wanted), needs_approval=True)
    async for row in rows:
        call = wanted[row.tool_use_id]
        if row.decision:
            call["approval"] = {"decision": row.decision, "by": row.decided_by}
        elif row.status == ToolCall.PENDING:
            call["approval"] = {"decision": None, "by": None, "approvalId": row.approval_id,
                                "expiresAt": iso_z(row.expires_at) if row.expires_at else None}


def mark_pending_approval(thread_id: str, resource_id: str, approval_id: str | None, *,
                          only_if: str | None = None) -> int:
    """Say (or, with ``None``, clear) that a tool call of the thread waits for
    a person's decision: the thread is busy meanwhile. ``only_if``: clear only
    that approval (a newer one stays). Not a turn's write: the version and
    ``updated_at`` stay. Sync (the chat app's tool-call store calls it)."""
    rows = SessionMapping.objects.filter(thread_id=thread_id, resource_id=resource_id)
    if only_if is not None:
        rows = rows.filter(pending_approval_id=only_if)
    return rows.update(pending_approval_id=approval_id)


async def delete_session(thread_id: str, resource_id: str) -> SessionMapping:
    """Delete a thread: its mapping, and its transcript wherever it is kept.

    The mapping and the transcript rows go in one transaction (unless another
    mapping still uses the session), then the CLI's local files. If the files
    cannot be removed the mapping is already gone (nothing points at a
    half-erased transcript) and :class:`EraseFailed` reports it.
    Raises :class:`NotFound` if there is no such thread.
    """
    mapping = await selectors.get_metadata(thread_id, resource_id)
    erase = await sync_to_async(_delete_rows)(mapping)
    log.info("[CHAT] Deleted session mapping thread=%s resource=%s", thread_id, resource_id)
    # Whoever holds the conversation elsewhere lets go: a turn running on it
    # stops (on any worker), warm processes close, the thread's lease goes.
    await thread_deleted.asend(
        sender=SessionMapping, thread_id=thread_id, resource_id=resource_id, session_id=mapping.session_id
    )
    if erase:
        try:
            await sync_to_async(erase_local_transcript)(mapping.session_id)
        except OSError as exc:
            raise EraseFailed(
                f"thread {thread_id!r} was deleted but its local transcript could not be removed: {exc}"
            ) from exc
    return mapping


def _delete_rows(mapping: SessionMapping) -> bool:
    """Delete the mapping and, if no other mapping shares its session, the
    transcript rows. True if the transcript is to be erased."""
    from .transcripts import erase_session_rows

    with transaction.atomic():
        mapping.delete()
        shared = SessionMapping.objects.filter(session_id=mapping.session_id).exists()
        if not shared:
            erase_session_rows(mapping.session_id)
    return not shared


async def erase_orphaned_session(session_id: str) -> bool:
    """Erase a session's transcript (rows and local files) if no mapping
    points at it: what a turn left behind on a thread deleted while it ran
    (its CLI may write after the delete). True if it was erased."""
    erased = await sync_to_async(_erase_if_unmapped)(session_id)
    if erased:
        await sync_to_async(erase_local_transcript)(session_id)
    return erased


def _erase_if_unmapped(session_id: str) -> bool:
    from .transcripts import erase_session_rows

    with transaction.atomic():
        if SessionMapping.objects.filter(session_id=session_id).exists():
            return False
        erase_session_rows(session_id)
    return True


def local_transcript_files(session_id: str) -> list[Path]:
    """The CLI's files of a session under ``CLAUDE_CONFIG_DIR``: the main
    ``projects/*/<id>.jsonl`` and the subagents' ``projects/*/<id>/**.jsonl``."""
    projects = Path(settings.CLAUDE_CONFIG_DIR) / "projects"
    pattern = glob.escape(session_id)
    return [*projects.glob(f"*/{pattern}.jsonl"), *projects.glob(f"*/{pattern}/**/*.jsonl")]


def drop_mirrored_local_transcript(session_id: str) -> bool:
    """With the transcript store on, the CLI's local copy is only a cache
    (resumes load from the database), and a copy left on this server's disk
    would survive a delete made on another server. Remove it once every line
    of it that has a uuid is in the database; keep it otherwise."""
    from .models import TranscriptEntry

    files = local_transcript_files(session_id)
    if not files:
        return False
    wanted = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                uuid = json.loads(line).get("uuid")
            except (ValueError, AttributeError):
                continue
            if isinstance(uuid, str):
                wanted.add(uuid)
    stored = set()
    ids = sorted(wanted)
    for start in range(0, len(ids), 500):
        stored.update(
            TranscriptEntry.objects.filter(session_id=session_id, uuid__in=ids[start : start + 500])
            .values_list("uuid", flat=True)
        )
    if wanted - stored:
        log.warning(
            "[CHAT] Local transcript of %s kept: %d lines are not in the database yet",
            session_id, len(wanted - stored),
        )
        return False
    erase_local_transcript(session_id)
    return True


def cli_scratch_dirs(session_id: str) -> list[Path]:
    """The CLI's scratch folders of a session in its temp dir,
    ``<TMPDIR>/claude-<uid>/<project>/<id>/``: it keeps there a copy of
    each image a message carried (``images/<n>.png``, which it names to the
    model), so they go with the session's local files."""
    base = Path(tempfile.gettempdir()) / f"claude-{os.getuid()}"
    return [p for p in base.glob(f"*/{glob.escape(session_id)}") if p.is_dir() and not p.is_symlink()]


def erase_local_transcript(session_id: str) -> int:
    """Remove the CLI's files for a session under ``CLAUDE_CONFIG_DIR``:
    ``projects/*/<id>.jsonl`` and the ``projects/*/<id>/`` folder of its
    subagents; and its scratch folder in the temp dir (:func:`cli_scratch_dirs`).
    Returns how many were removed."""
    projects = Path(settings.CLAUDE_CONFIG_DIR) / "projects"
    removed = 0
    for path in cli_scratch_dirs(session_id):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    for path in projects.glob(f"*/{glob.escape(session_id)}.jsonl"):
        path.unlink(missing_ok=True)
        removed += 1
    for path in projects.glob(f"*/{glob.escape(session_id)}"):
        if path.is_dir():
            shutil.rmtree(path)
            removed += 1
    return removed
