"""Django-ORM-backed :class:`claude_agent_sdk.SessionStore`: session transcripts
in the project's own database (embedded libSQL file, libSQL server or
PostgreSQL), next to the session mappings.

Usage::

    from claude_agent_sdk import ClaudeAgentOptions, query
    from sessions_app.transcripts import DjangoSessionStore

    options = ClaudeAgentOptions(session_store=DjangoSessionStore(), cwd=WORKDIR, ...)
    async for message in query(prompt="Hello!", options=options):
        ...  # the CLI's transcript lines are mirrored into the database

    # A later turn resumes from the database, even on a machine (or a
    # CLAUDE_CONFIG_DIR) that never saw the local JSONL file:
    options = ClaudeAgentOptions(session_store=DjangoSessionStore(), cwd=WORKDIR,
                                 resume=session_id, ...)

Schema (migration ``sessions_app/0002_transcripts``)::

    sessions_app_transcriptentry          -- one row per transcript line
      id          bigint autoincrement    -- order of the lines of a key
      project_key varchar(255)            -- SessionKey.project_key
      session_id  varchar(255)
      subpath     varchar(1024) = ''      -- '' = main transcript, else e.g. 'subagents/agent-1'
      uuid        varchar(255) NULL       -- entry["uuid"], the idempotency key
      data        text                    -- json.dumps(entry)
      created_at  timestamp               -- storage write time of the batch
      UNIQUE (project_key, session_id, subpath, uuid) WHERE uuid IS NOT NULL
      INDEX  (session_id, project_key, subpath, id)

    sessions_app_transcriptsummary        -- one row per main transcript
      project_key, session_id             -- UNIQUE together; INDEX (session_id)
      mtime_ms    bigint                  -- storage write time, epoch ms
      data        text                    -- json.dumps(fold_session_summary(...)["data"])

Contract (``SessionStore`` in ``claude_agent_sdk/types.py``; all 14 contracts of
``claude_agent_sdk.testing.run_session_store_conformance`` pass on both the
libSQL file and PostgreSQL):

* ``append`` writes one batch in ONE transaction, in list order (increasing
  ``id``). A main-transcript batch first locks the session's summary row
  (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite/libSQL the engine opens
  every transaction with ``BEGIN IMMEDIATE``, so a write transaction is
  already exclusive), then inserts the lines, folds them into the summary
  with the SDK's :func:`~claude_agent_sdk.fold_session_summary` and stamps
  ``mtime_ms``. Concurrent appends to one session are therefore serialized
  and ordered by commit.
* Entries with a string ``uuid`` are idempotent: the lines go in with
  multi-row ``INSERT OR IGNORE`` (SQLite/libSQL) or ``INSERT ... ON CONFLICT
  DO NOTHING`` (PostgreSQL), the SQL of ``bulk_create(ignore_conflicts=True)``,
  so the partial unique index skips lines already stored and a retried or
  overlapping batch adds nothing twice (nor a uuid repeated within a batch).
  Entries without a ``uuid`` (titles, tags, mode markers, ...) are appended
  without dedup.
* ``load`` returns the entries deep-equal to what was appended, or ``None``
  for a key with no rows. ``data`` is a text column of ``json.dumps`` output,
  not a ``JSONField``: exact round trip (key order too), no JSON1 functions
  needed, and ``\u0000`` (which PostgreSQL ``jsonb`` rejects) is stored
  fine. Over a libSQL server a load goes in pages of about 1 MiB, since
  libsql-client refuses any answer over 4 MiB.
* ``mtime`` (``list_sessions`` and ``list_session_summaries``) is the same
  ``mtime_ms`` column: the committing server's wall clock in epoch
  milliseconds, taken inside the write transaction and kept strictly
  increasing per session (``max(now, previous + 1)``), never derived from
  entry timestamps. ``list_sessions`` reads the summary table, so it costs one
  row per session, not per line; subagent subpaths are never listed.
* ``delete`` of a main key removes the key, every subpath under it and the
  summary; a key with a ``subpath`` removes only that subpath.
* ``list_subkeys`` lists the distinct non-empty subpaths of a session.

How the SDK uses it (claude-agent-sdk 0.2.187): ``project_key`` is the
CLI's project directory name for ``cwd`` (``project_key_for_directory``), so a
session resumes from the store only with the same ``cwd``. The server's
clients use ``session_store_flush="eager"`` (:func:`chat_app.sdk.build_options`):
each frame of lines the CLI writes is one ``append`` as it comes (the
person's message before the model is called, each finished reply or tool
result after), so a turn cut short by its worker dying keeps what it had
written; ``"batched"`` (the SDK's default) appends once per transcript file
at the turn's result (also every 500 entries / 1 MiB) and at close. A
failed batch is retried 3 times, then reported as a ``MirrorErrorMessage``
in the message stream. :attr:`DjangoSessionStore.prompts` counts the
person's messages a store has committed, for a turn to wait for its own.

A connection the database dropped (a restart) is replaced before the next
operation, and an operation that meets one at its first use runs once more on
a new connection (:mod:`sessions_app.outages`); with ``outage_seconds`` a
write also waits that long for a database that is away (a short outage),
retrying the whole batch: under the SDK's own 3 attempts within a second, a
turn's batch would be dropped by any outage longer than that.

Retention is the caller's business: the SDK never deletes from the store.
Helpers for the rest of the project: :func:`erase_session` /
:func:`erase_session_rows` remove a session everywhere (thread deletion),
:func:`session_messages` gives the conversation for a page reload and
:func:`fork_point` where to cut a fork at one of its messages. Async
methods run their ORM work in ``sync_to_async(thread_sensitive=True)``, one
call (and at most one transaction) per operation, through
:func:`~sessions_app.outages.reconnecting`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async
from claude_agent_sdk import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
    fold_session_summary,
)
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models.functions import Length

from .models import TranscriptEntry, TranscriptSummary
from .outages import ConnectionLost, outlasting, reconnecting, within
from . import sql

__all__ = [
    "DjangoSessionStore",
    "erase_session",
    "erase_session_rows",
    "fork_point",
    "main_transcript",
    "session_messages",
    "transcript_messages",
]

MAIN = ""  # the subpath of a main transcript


def _dumps(value: Any) -> str:
    # ensure_ascii (the default) keeps lone surrogates and NULs as \u escapes:
    # the text is always valid UTF-8 and PostgreSQL text accepts it.
    return json.dumps(value, separators=(",", ":"))


def _subpath(key: SessionKey) -> str:
    return key.get("subpath") or MAIN


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# A libSQL server answers each query in one Hrana message, and libsql-client
# refuses messages over 4 MiB: a remote load goes in pages of about 1 MiB
# of JSON text (ASCII; at most twice that once escaped for the wire).
REMOTE_PAGE_CHARS = 1 << 20


def _paged(connection) -> bool:
    return bool(getattr(connection, "is_remote", False))


def _texts_in_order(lines) -> list[str]:
    """The ``data`` of a queryset of transcript lines, in ``id`` order."""
    lines = lines.order_by("id")
    if not _paged(connections[lines.db]):
        return list(lines.values_list("data", flat=True))
    sizes = list(lines.values_list("id", Length("data")))
    texts: list[str] = []
    start = 0
    while start < len(sizes):
        end, chars = start + 1, sizes[start][1]
        while end < len(sizes) and chars + sizes[end][1] <= REMOTE_PAGE_CHARS:
            chars += sizes[end][1]
            end += 1
        texts += lines.filter(id__gte=sizes[start][0], id__lte=sizes[end - 1][0]).values_list(
            "data", flat=True
        )
        start = end
    return texts


_COLUMNS = ("project_key", "session_id", "subpath", "uuid", "data", "created_at")


def _insert_rows(connection, rows: list[tuple]) -> None:
    """Insert transcript lines (values of ``_COLUMNS``) in list order,
    skipping duplicate uuids: :func:`sessions_app.sql.transcript_insert`."""
    sql.transcript_insert(connection, names_given=_COLUMNS, rows=rows)


@dataclass
class _Summary:
    id: int
    mtime_ms: int
    data: str


def _lock_summary(connection, project_key: str, session_id: str) -> _Summary:
    """The session's summary row, locked until the transaction ends
    (:func:`sessions_app.sql.summary_lock`; a new session's is a
    placeholder, ``data == ""``). Plain SQL: this runs on every append (a
    turn's), where compiling the ORM's queries cost more than running them."""
    return _Summary(*sql.summary_lock(connection, project_key=project_key, session_id=session_id))


def _update_summary(connection, pk: int, mtime_ms: int, data: str) -> None:
    sql.summary_update(connection, pk=pk, mtime_ms=mtime_ms, data=data)


class DjangoSessionStore(SessionStore):
    """:class:`~claude_agent_sdk.SessionStore` on the Django ORM (see the module
    docstring for the schema and the contract). ``using`` picks the database
    alias; the default is ``"default"``.

    ``shared_sessions``: session ids that :meth:`load` and :meth:`list_subkeys`
    read from whichever project key holds them when the asked one holds
    none. A fork passes its parent: the CLI loads the parent's transcript
    under its own project key (its working directory), and the parent, which
    may be stored under another worker's key (and be running a turn there),
    is read where it is, never moved. Writes are never redirected.

    ``outage_seconds``: how long a write (``append``, ``delete``) waits for a
    database that cannot be reached, trying again (0, the default: it fails
    at once, after one reconnect). The project passes its lease time, the
    longest outage a turn survives (:func:`chat_app.sdk.session_store`)."""

    def __init__(self, using: str = DEFAULT_DB_ALIAS, *, shared_sessions=(),
                 outage_seconds: float = 0.0) -> None:
        self.using = using
        self.shared_sessions = frozenset(shared_sessions)
        # The person's messages this store has committed (main transcripts),
        # and who waits for a count: see :meth:`prompts_stored`.
        self.prompts = 0
        self._prompt_waiters: list[tuple[int, asyncio.Future]] = []
        self.outage_seconds = outage_seconds
        self._gave_up_at: float | None = None  # when a write last stopped waiting for the database

    async def _run(self, fn, *args, wait: bool = False):
        """``fn(*args)`` on the database thread, on a usable connection
        (:func:`~sessions_app.outages.reconnecting`: a connection the
        database dropped is replaced, and the work runs once more). ``wait``
        (a write): while the database cannot be reached, try again for up to
        ``outage_seconds``, so a batch of a turn that outlives a short outage
        is stored, not dropped (entries dedupe by uuid: a batch whose commit
        was lost with its connection adds nothing twice). One wait per
        outage: the writes right after one that gave up (the SDK's retries
        of its batch) try once and do not wait the whole time again."""
        call = sync_to_async(functools.partial(reconnecting, fn, *args, using=self.using),
                             thread_sensitive=True)
        try:
            value = await call()
        except ConnectionLost:
            patient = wait and self.outage_seconds > 0 and (
                self._gave_up_at is None or time.monotonic() - self._gave_up_at >= self.outage_seconds)
            if not patient:
                raise
            try:
                value = await outlasting(call, within(self.outage_seconds), "a transcript write")
            except ConnectionLost:
                self._gave_up_at = time.monotonic()
                raise
        self._gave_up_at = None
        return value

    def __repr__(self) -> str:
        shared = f", shared_sessions={sorted(self.shared_sessions)!r}" if self.shared_sessions else ""
        patience = f", outage_seconds={self.outage_seconds!r}" if self.outage_seconds else ""
        return f"DjangoSessionStore(using={self.using!r}{shared}{patience})"

    def _project_of(self, key) -> str:
        """The project key to read ``key`` from (see ``shared_sessions``)."""
        project_key, session_id = key["project_key"], key["session_id"]
        if session_id not in self.shared_sessions:
            return project_key
        entries = TranscriptEntry.objects.using(self.using).filter(session_id=session_id)
        if entries.filter(project_key=project_key).exists():
            return project_key
        # the key holding the session's latest line (a session moves as a whole)
        return entries.order_by("-id").values_list("project_key", flat=True).first() or project_key

    # --- writes ---------------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        await self._run(self._append, key, entries, wait=True)
        if _subpath(key) == MAIN and (count := sum(map(_is_prompt, entries))):
            self.prompts += count
            waiting, self._prompt_waiters = self._prompt_waiters, []
            for wanted, future in waiting:
                if self.prompts < wanted:
                    self._prompt_waiters.append((wanted, future))
                elif not future.done():
                    future.set_result(None)

    async def prompts_stored(self, count: int, timeout: float) -> bool:
        """Wait until this store has committed ``count`` of the person's
        messages (main-transcript user lines that are not tool results);
        False if it has not within ``timeout`` seconds (a batch that failed,
        the database away). A turn takes :attr:`prompts` before it sends its
        message and waits for one more before it tells anyone the message
        was taken."""
        if self.prompts >= count:
            return True
        future = asyncio.get_running_loop().create_future()
        self._prompt_waiters.append((count, future))
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            self._prompt_waiters = [w for w in self._prompt_waiters if w[1] is not future]

    def _append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        project_key, session_id, subpath = key["project_key"], key["session_id"], _subpath(key)
        rows = []
        for entry in entries:
            uuid = entry.get("uuid") if isinstance(entry, dict) else None
            rows.append((uuid if isinstance(uuid, str) and uuid else None, _dumps(entry)))
        connection = connections[self.using]
        with transaction.atomic(using=self.using):
            summary = _lock_summary(connection, project_key, session_id) if subpath == MAIN else None
            now_ms = _now_ms()
            if summary is not None and summary.data:
                now_ms = max(now_ms, summary.mtime_ms + 1)
            created_at = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
            stamp = connection.ops.adapt_datetimefield_value(created_at)
            _insert_rows(
                connection,
                [(project_key, session_id, subpath, uuid, data, stamp) for uuid, data in rows],
            )
            if summary is not None:
                prev: SessionSummaryEntry | None = None
                if summary.data:
                    prev = {
                        "session_id": session_id,
                        "mtime": summary.mtime_ms,
                        "data": json.loads(summary.data),
                    }
                folded = fold_session_summary(prev, key, entries)
                _update_summary(connection, summary.id, now_ms, _dumps(folded["data"]))

    async def delete(self, key: SessionKey) -> None:
        await self._run(self._delete, key, wait=True)

    def _delete(self, key: SessionKey) -> None:
        project_key, session_id, subpath = key["project_key"], key["session_id"], _subpath(key)
        entries = TranscriptEntry.objects.using(self.using).filter(
            session_id=session_id, project_key=project_key
        )
        if subpath != MAIN:
            entries.filter(subpath=subpath).delete()
            return
        with transaction.atomic(using=self.using):
            entries.delete()  # the main transcript and every subpath under it
            TranscriptSummary.objects.using(self.using).filter(
                project_key=project_key, session_id=session_id
            ).delete()

    # --- reads ----------------------------------------------------------------

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return await self._run(self._load, key)

    def _load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        lines = TranscriptEntry.objects.using(self.using).filter(
            session_id=key["session_id"], project_key=self._project_of(key), subpath=_subpath(key)
        )
        texts = _texts_in_order(lines)
        return [json.loads(text) for text in texts] if texts else None

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        return await self._run(self._list_sessions, project_key)

    def _list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        rows = TranscriptSummary.objects.using(self.using).filter(
            project_key=project_key
        ).exclude(data="").values_list("session_id", "mtime_ms")
        return [{"session_id": sid, "mtime": mtime} for sid, mtime in rows]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        return await self._run(self._list_session_summaries, project_key)

    def _list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        rows = TranscriptSummary.objects.using(self.using).filter(
            project_key=project_key
        ).exclude(data="").values_list("session_id", "mtime_ms", "data")
        return [{"session_id": sid, "mtime": mtime, "data": json.loads(data)} for sid, mtime, data in rows]

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        return await self._run(self._list_subkeys, key)

    def _list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        project_key = key["project_key"]
        if key["session_id"] in self.shared_sessions:
            project_key = self._project_of(key)
        rows = (
            TranscriptEntry.objects.using(self.using)
            .filter(session_id=key["session_id"], project_key=project_key)
            .exclude(subpath=MAIN)
            .order_by("subpath")
            .values_list("subpath", flat=True)
            .distinct()
        )
        return list(rows)


# --- helpers for the rest of the project ----------------------------------------


def erase_session_rows(session_id: str, using: str = DEFAULT_DB_ALIAS) -> int:
    """Sync core of :func:`erase_session`, for callers already in a sync
    context or inside their own ``transaction.atomic()`` (it nests)."""
    with transaction.atomic(using=using):
        lines, _ = TranscriptEntry.objects.using(using).filter(session_id=session_id).delete()
        summaries, _ = TranscriptSummary.objects.using(using).filter(
            session_id=session_id
        ).delete()
    return lines + summaries


async def erase_session(session_id: str, using: str = DEFAULT_DB_ALIAS) -> int:
    """Delete every stored row of ``session_id``: all project keys, the main
    transcript, its subpaths and its summaries. Returns the number of rows
    deleted (transcript lines plus summary rows; 0 if nothing was stored)."""
    return await sync_to_async(erase_session_rows, thread_sensitive=True)(session_id, using)


def rekey_session(session_id: str, project_key: str, using: str = DEFAULT_DB_ALIAS) -> int:
    """Move a session stored under other project keys to ``project_key``
    (the CLI's project is its working directory, which differs between
    machines or data dirs). Returns the number of transcript lines moved."""
    entries = TranscriptEntry.objects.using(using).filter(session_id=session_id)
    with transaction.atomic(using=using):
        if entries.filter(project_key=project_key).exists():
            return 0
        source = entries.order_by("-id").values_list("project_key", flat=True).first()
        if source is None:
            return 0
        lines = entries.filter(project_key=source).update(project_key=project_key)
        TranscriptSummary.objects.using(using).filter(
            session_id=session_id, project_key=source
        ).update(project_key=project_key)
    return lines


# Text the CLI writes into user entries itself (slash commands, hooks,
# reminders, IDE context, interrupt markers): never shown as the person's words.
_CLI_TAGS = (
    "bash-input|bash-stderr|bash-stdout|command-args|command-contents|command-message|"
    "command-name|command-stderr|command-stdout|goal|ide_diagnostics|ide_opened_file|"
    "ide_selection|local-command-caveat|local-command-stderr|local-command-stdout|"
    "new-diagnostics|session-start-hook|system-reminder|task-notification|tick|"
    "user-memory-input|user-prompt-submit-hook"
)
_CLI_TAGGED = re.compile(rf"<({_CLI_TAGS})(?:\s[^>]*)?>.*?</\1>", re.DOTALL)
_CLI_OPENING = re.compile(rf"\s*<({_CLI_TAGS})[\s>/]")  # a CLI text without its closing tag
_CLI_MARKER = re.compile(r"^\s*\[Request interrupted by user[^\]]*\]\s*$")


def _typed_text(text: Any) -> str:
    """``text`` without CLI-injected parts; empty if nothing typed remains."""
    if not isinstance(text, str):
        return ""
    text = _CLI_TAGGED.sub("", text)
    if not text.strip() or _CLI_MARKER.match(text) or _CLI_OPENING.match(text):
        return ""
    return text.strip()


def _user_text(entry: dict) -> str:
    if entry.get("isMeta") is True or entry.get("isCompactSummary") is True:
        return ""
    if entry.get("isVisibleInTranscriptOnly") is True:
        return ""
    message = entry.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return _typed_text(content)
    if not isinstance(content, list) or any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    ):
        return ""  # a tool's answer (and anything riding along with it)
    from .attachments.services import marked_id

    parts = [
        _typed_text(block.get("text"))
        for block in content
        if isinstance(block, dict) and block.get("type") == "text" and marked_id(block) is None
    ]
    return "\n\n".join(part for part in parts if part)


def _assistant_text(entry: dict) -> tuple[str | None, str]:
    message = entry.get("message")
    if not isinstance(message, dict):
        return None, ""
    content = message.get("content")
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = [
            block["text"]
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ]
    else:
        parts = []
    message_id = message.get("id")
    return (message_id if isinstance(message_id, str) else None), "\n\n".join(
        part for part in parts if part
    )


def _is_prompt(entry) -> bool:
    """A line of the person's message (the CLI writes one per message sent):
    a user entry, not the CLI's own (``isMeta``) and not a tool's answer."""
    if not isinstance(entry, dict) or entry.get("type") != "user" or entry.get("isMeta") is True:
        return False
    if entry.get("isSidechain") is True:
        return False
    return not _blocks(entry, "tool_result")


ATTACHMENT_BLOCKS = ("image", "document")


def _attachment_refs(entry: dict) -> list[dict]:
    """The images and documents a person's message carries (contract §11),
    each as ``{"attachmentId", "sha256", "name", "mediaType", "size"}``: the
    upload its marker block names (:func:`sessions_app.attachments.services.marker_block`),
    else None, and the sha256 of the block's bytes (the upload's, unless the
    CLI re-encoded them); never the bytes themselves."""
    if entry.get("isMeta") is True or _blocks(entry, "tool_result"):
        return []
    message = entry.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    from .attachments.services import marked_id

    refs, named = [], None
    for block in content if isinstance(content, list) else ():
        if (marked := marked_id(block)) is not None:
            named = marked  # the upload the next block carries
            continue
        if not isinstance(block, dict) or block.get("type") not in ATTACHMENT_BLOCKS:
            continue
        attachment_id, named = named, None
        source = block.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("data"), str):
            continue
        try:
            data = (source["data"].encode("utf-8") if source.get("type") == "text"
                    else base64.b64decode(source["data"]))
        except (ValueError, UnicodeEncodeError):
            continue
        title = block.get("title")
        refs.append({"attachmentId": attachment_id, "sha256": hashlib.sha256(data).hexdigest(),
                     "name": title if isinstance(title, str) and title else block["type"],
                     "mediaType": str(source.get("media_type") or ""), "size": len(data)})
    return refs


def _synthetic(entry: dict) -> bool:
    """An assistant entry the CLI wrote itself, not the model: e.g. "No
    response requested." after a message whose turn was cut short (the
    worker died before any reply was stored), added when the session resumes."""
    message = entry.get("message")
    return isinstance(message, dict) and message.get("model") == "<synthetic>"


def _blocks(entry: dict, kind: str) -> list[dict]:
    message = entry.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == kind]


def _result_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") if b.get("type") == "text" else f"[{b.get('type')}]"
                         for b in content if isinstance(b, dict))
    return ""


def transcript_messages(entries: list[dict], *, attachments: bool = True) -> list[dict]:
    """The conversation in transcript ``entries`` (see :func:`session_messages`);
    ``attachments=False``: texts only (no hashing of attachments' bytes)."""
    messages: list[dict] = []
    calls: dict[str, dict] = {}  # toolUseId -> the toolCalls entry of its assistant message
    last_id: str | None = None  # message.id of the assistant reply being read
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("isSidechain") is True:
            continue
        kind = entry.get("type")
        uuid = entry.get("uuid") if isinstance(entry.get("uuid"), str) else ""
        if kind == "user":
            for block in _blocks(entry, "tool_result"):
                if (call := calls.get(block.get("tool_use_id"))) is not None:
                    call["result"] = _result_text(block.get("content"))
                    call["isError"] = block.get("is_error") is True
            text = _user_text(entry)
            refs = _attachment_refs(entry) if attachments else []
            if text or refs:
                messages.append({"role": "user", "text": text, "uuid": uuid})
                if refs:
                    messages[-1]["attachments"] = refs
                last_id = None
        elif kind == "assistant":
            if entry.get("isApiErrorMessage") is True or _synthetic(entry):
                continue  # the CLI's own stand-in (a failed model call, a lost turn), not a reply
            message_id, text = _assistant_text(entry)
            uses = [{"toolUseId": b.get("id"), "tool": b.get("name"), "input": b.get("input") or {},
                     "result": None, "isError": False, "approval": None}
                    for b in _blocks(entry, "tool_use") if isinstance(b.get("id"), str)]
            same_reply = message_id is not None and message_id == last_id
            last_id = message_id
            if not text and not uses:
                continue
            if same_reply and messages and messages[-1]["role"] == "assistant":
                if text:
                    joined = messages[-1]["text"]
                    messages[-1]["text"] = joined + "\n\n" + text if joined else text
            else:
                messages.append({"role": "assistant", "text": text, "uuid": uuid})
            if uses:
                messages[-1].setdefault("toolCalls", []).extend(uses)
                calls.update((use["toolUseId"], use) for use in uses)
    return messages


def main_transcript(session_id: str, using: str = DEFAULT_DB_ALIAS) -> list[dict]:
    """The stored main transcript of ``session_id`` (sync), under the project
    key written most recently if several hold the id; ``[]`` if none does."""
    project_key = (
        TranscriptSummary.objects.using(using)
        .filter(session_id=session_id)
        .order_by("-mtime_ms", "-id")
        .values_list("project_key", flat=True)
        .first()
    )
    lines = TranscriptEntry.objects.using(using).filter(session_id=session_id, subpath=MAIN)
    if project_key is None:  # lines without a summary row: take the newest key
        project_key = lines.order_by("-id").values_list("project_key", flat=True).first()
        if project_key is None:
            return []
    return [json.loads(text) for text in _texts_in_order(lines.filter(project_key=project_key))]


async def session_messages(session_id: str, using: str = DEFAULT_DB_ALIAS) -> list[dict]:
    """The conversation of ``session_id`` as ``[{"role", "text", "uuid"}]``, in order.

    A person's message with images or documents also has ``"attachments"``
    (see :func:`_attachment_refs`; its text may then be ``""``).

    Reads the main transcript of the session from the store, under any
    project key (the most recently written one if several hold the id).
    User messages are what the person typed: ``type == "user"`` entries whose
    content is a string or has ``text`` blocks, without tool results,
    ``isMeta``/compact-summary entries and CLI-injected text
    (``<command-name>``, ``<local-command-stdout>``, ``<system-reminder>``,
    ...). Assistant messages are the ``text`` blocks of ``type ==
    "assistant"`` entries; consecutive entries of one reply (same
    ``message.id``) merge into one message carrying the first entry's uuid.
    Several text blocks are joined with a blank line. The CLI's synthetic
    replies (``isApiErrorMessage``, "API Error: ...", and model
    ``<synthetic>``, e.g. "No response requested." after a message whose
    turn a crash cut short) are left out: not something the assistant
    said. An unknown session gives ``[]``.
    """

    entries = await sync_to_async(main_transcript, thread_sensitive=True)(session_id, using)
    # off the event loop: a message's attachments are hashed (megabytes)
    return await sync_to_async(transcript_messages, thread_sensitive=False)(entries)


def fork_cut(entries: list[dict], message_uuid: str) -> str | None:
    """See :func:`fork_point`."""
    cut, reply_id = None, None
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("isSidechain") is True:
            continue
        if cut is None:
            if entry.get("uuid") == message_uuid:
                cut = message_uuid
                if entry.get("type") != "assistant":
                    return cut
                reply_id, _ = _assistant_text(entry)
                if reply_id is None:
                    return cut
            continue
        kind = entry.get("type")
        if kind == "user":
            break
        if kind == "assistant":
            if _assistant_text(entry)[0] != reply_id:
                break
            if isinstance(entry.get("uuid"), str):
                cut = entry["uuid"]
    return cut


async def fork_point(
    session_id: str, message_uuid: str, using: str = DEFAULT_DB_ALIAS
) -> str | None:
    """The transcript uuid to fork ``session_id`` at so that the fork ends
    with the message :func:`session_messages` reported as ``message_uuid``:
    pass it as ``up_to_message_id`` to the SDK's ``fork_session_via_store``,
    which cuts right after that entry. For an assistant reply written as
    several entries (same ``message.id``) that is the reply's LAST entry, not
    the first one the message is named by. ``None`` if the session's main
    transcript has no such entry."""
    entries = await sync_to_async(main_transcript, thread_sensitive=True)(session_id, using)
    return fork_cut(entries, message_uuid)
