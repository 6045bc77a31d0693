"""Driving the SDK: one conversation turn on one Claude process.

A :class:`Turn` runs in an asyncio task of its own (the registry starts it),
not in the request that started it: a client that goes away does not cut it
short; it runs to its end, its transcript and mapping are saved and its
process goes back to the pool (kept warm) or exits.

It runs on a process from :mod:`chat_app.pool`: its thread's warm client, a
spare, or a CLI started for it within the server's process budget. Its
events go to its :class:`~chat_app.turns.buffer.EventLog`; the last one
(``done`` or ``error``) is held back until the thread is free again (process
given back, lease released), because a client may send its next message, to
any worker, the moment it reads it.

A turn can be stopped three ways: :meth:`Turn.interrupt` (a person's Stop:
the model stops and the turn ends with ``done``), :meth:`Turn.abort` (its
thread was deleted: nothing more is saved, its process is closed, its
transcript erased, and it ends with an ``error``), and a lost lease
(another worker took the thread: it saves nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from claude_agent_sdk import (
    AssistantMessage, ClaudeSDKClient, ClaudeSDKError, ResultMessage, ToolResultBlock, ToolUseBlock,
    UserMessage,
)
from django.conf import settings
from django.db import IntegrityError, close_old_connections
from django.utils import timezone

from omni import logs
from sessions_app.attachments import services as attachments
from sessions_app.errors import ApiError, unavailable_retry_after
from sessions_app.outages import ConnectionLost
from sessions_app import toolcalls as calls
from sessions_app import usage
from sessions_app.services import ThreadDeleted

from .. import events, leases, metrics
from ..pool import Slot, WarmClient, pool
from ..sdk import build_options, session_store
from ..tools import Caller, ToolContext
from . import queued, store
from .buffer import EventLog
from .states import TRANSITIONS, BadTransition, Ending, State

log = logging.getLogger("omni.chat")

MISSING_SESSION = "No conversation found with session ID"
DELETED = "the thread was deleted; its turn was stopped"
INTERRUPT_SECONDS = 5.0  # the longest an interrupt waits for the CLI's answer
MESSAGE_STORED_SECONDS = 10.0  # the longest a turn waits for its message to be stored
DECISION_POLL_SECONDS = 2.0  # a waiting turn looks at its call this often (decided on a worker it cannot hear)
DETACHED = ("the server process running this turn is stopping; the tool call still waits for a "
            "decision: follow the thread again")
_background: set[asyncio.Task] = set()  # interrupts nobody waits for
WORKER = f"{socket.gethostname()}:{os.getpid()}"
# AssistantMessage.error values that mean the model endpoint failed us, not the request.
MODEL_UNAVAILABLE = {"server_error", "rate_limit"}


def new_turn_id() -> str:
    return uuid.uuid4().hex


def unsaved_error() -> dict:
    """The ending of a turn the database was away for too long to save
    (longer than the thread's lease): ``unavailable``, with the
    ``Retry-After`` of a 503 for an unreachable database; the thread is free
    again by then."""
    return events.error_event(
        "unavailable", "the database was unreachable, so this turn's reply was not saved; "
        "send the message again", retry_after=unavailable_retry_after())


@dataclass
class TurnSpec:
    """A validated turn: who, which thread, what to say, how."""

    resource_id: str
    thread_id: str
    message: str
    agent: str
    preset: dict
    turn_id: str = ""
    resume_session_id: str | None = None  # the thread's (or fork parent's) session
    fork_from_thread_id: str | None = None
    at_message_uuid: str | None = None
    forked_from_thread_id: str | None = None  # the mapping's value, kept on later turns
    version: int | None = None  # the mapping's version at turn start (warm-client staleness)
    new_thread: bool = True  # no mapping at turn start: its first save creates it
    continuation: object | None = None  # a decided ToolCall this turn continues after (no message)
    chunks: bool = True  # False: no chunk events (a client that reads none)
    agent_given: bool = False  # the request named the agent (else the thread's is kept)
    attachment_ids: list[str] = field(default_factory=list)  # as the request named them
    # Their rows (sessions_app.models.Attachment), found by the admission path.
    attachments: list = field(default_factory=list)
    queue_id: str | None = None  # a queued message's turn (chat_app.queue): its row
    queued_event: dict | None = None  # its ``queued`` event: the turn's seq 0 (ifBusy enqueue)

    def __post_init__(self):
        self.turn_id = self.turn_id or new_turn_id()

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_id, self.thread_id)

    @property
    def shown_text(self) -> str:
        """The message as the thread's title and preview show it: its text,
        or (only attachments) their names."""
        if self.attachments and not self.message.strip():
            return ", ".join(a.name for a in self.attachments)
        return self.message


class Stopped(Exception):
    """The turn was stopped from outside (its thread deleted, its lease
    lost): it saves nothing more."""


@dataclass
class Run:
    """What one run of the CLI left: a tool call now waiting for a person
    (``deferred``), or the turn's result to save."""

    result: ResultMessage | None = None
    deferred: object | None = None
    api_error: str | None = None  # the CLI's stand-in reply for a failed model call


class Turn:
    """One turn, as a state machine (:mod:`.states`): :meth:`run` drives it
    from ``ADMITTED`` to ``ENDED``; :meth:`_enter` is the one place it moves.

    Who owns what while it runs:

    * the thread's **lease**: taken by the admission path, then owned by
      :meth:`run` (:func:`chat_app.leases.holding`: renewed, and let go on the
      way out unless the last save let it go in its transaction);
    * the **process slot**: reserved by the admission path, then owned by the
      turn: given back in :meth:`_free_process` only (warm for the thread's
      next turn after a clean end; also while it waits for a decision, and
      taken again by the admission path when it goes on);
    * the **ending** (last event and outcome): decided once, in
      :meth:`_conclude` (the first conclusion wins: a delete or a lost lease
      concludes at once, from outside).
    """

    def __init__(self, spec: TurnSpec, slot: Slot | None, lease: leases.Lease | None = None,
                 readmit=None):
        self.spec = spec
        # ``await readmit(turn)``: the admission path again, before the turn
        # goes on after a decision (given by :mod:`.admission`, which made it)
        self._readmit = readmit
        self.slot = slot  # the live process this turn runs on (pool)
        self.lease = lease  # the thread's lease across processes
        self.log = EventLog(spec.turn_id, spec.thread_id)
        self.state = State.ADMITTED
        self.history: list[State] = [State.ADMITTED]  # every state it was in, in order
        self.ending: Ending | None = None
        self.saved = False  # the last save (mapping, record, lease's end) is committed
        self.session_id: str | None = None
        self.task: asyncio.Task | None = None
        self._kept: WarmClient | None = None  # the client to keep warm after the turn
        self._version: int | None = None  # the mapping's version after this turn's writes
        self._message_unsaved = False  # a follow-up: its message goes in with the turn's last save
        # The message's content blocks (each attachment after its marker, then
        # the text), or None: a text-only message goes to the CLI as a string.
        self._content: list[dict] | None = None
        self._client: ClaudeSDKClient | None = None
        self._interrupted = False
        self._streaming_id: str | None = None
        self._reply: list[str] = []  # the assistant's text of this turn (across continuations)
        self._decided = asyncio.Event()  # woken when a decision may have come
        self._detached = False  # the server stops: a waiting turn lets go, its call waits on
        self._approval_event: dict | None = None  # published once the session event is out
        self._queue_mark: asyncio.Future | None = None  # a queued message's row marked started
        # What the turn used and cost (its own figures: a warm process's totals run on).
        self.started_at = timezone.now()
        self._started = time.monotonic()
        # When the turn reached each step (seconds after it started, the
        # first each time): where a turn's time goes (bench/spare.py), and its
        # time to first text (its record).
        self.marks: dict[str, float] = {}
        self._cost = 0.0
        self._usage = dict.fromkeys(events.TOKEN_KINDS, 0)
        self._model = ""

    # --- what the rest of the server reads ----------------------------------
    @property
    def turn_id(self) -> str:
        return self.spec.turn_id

    @property
    def events(self) -> list[dict]:
        return self.log.events

    @property
    def finished(self) -> bool:
        """Its last event is published."""
        return self.state is State.ENDED

    @property
    def waiting(self) -> bool:
        """True while the turn waits for a person's decision (no process held)."""
        return self.state is State.WAITING

    def wake(self) -> None:
        """A decision may have come (this worker's, or another's over the channel layer)."""
        self._decided.set()

    def detach(self) -> None:
        """The server stops: a turn waiting for a decision ends now, its call
        stays pending (any worker continues the conversation once decided)."""
        self._detached = True
        self._decided.set()

    def listen(self, start: int = 0):
        """Every event from ``start`` on, as they come, until the turn ends."""
        return self.log.listen(start)

    def retry_after(self) -> float:
        """How long the thread stays busy at most (its lease's remaining time)."""
        return self.lease.remaining() if self.lease is not None else leases.lease_seconds()

    # --- states -------------------------------------------------------------------
    def _enter(self, state: State) -> None:
        """Move to ``state``: the one place a turn changes state (staying is no move)."""
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise BadTransition(f"turn {self.turn_id}: {self.state.value} -> {state.value}")
        self.state = state
        self.history.append(state)

    def _conclude(self, event: dict) -> Ending:
        """Decide how the turn ends (once: the first conclusion stands)."""
        if self.ending is None:
            self.ending = Ending.of(event, interrupted=self._interrupted)
        return self.ending

    def _stopped(self) -> None:
        """Raise :class:`Stopped` if the turn was stopped from outside."""
        if self.ending is not None and self.ending.stopped:
            raise Stopped(self.ending.outcome)

    # --- stopping ---------------------------------------------------------------
    async def interrupt(self) -> None:
        """Ask the CLI to stop (bounded: a CLI that closes meanwhile never
        answers the SDK's control request). A turn waiting for a decision:
        its call is denied, and the conversation goes on without it."""
        self._interrupted = True
        self._decided.set()
        if self._client is not None:
            try:
                async with asyncio.timeout(INTERRUPT_SECONDS):
                    await self._client.interrupt()
            except Exception:  # the CLI may be gone already, or closing
                log.debug("interrupt failed", exc_info=True)

    async def abort(self, code: str, message: str) -> None:
        """Stop the turn for good: it saves nothing more and ends with an
        ``error`` event of ``code`` (its thread was deleted). Returns at once:
        the caller (a delete) does not wait for the CLI."""
        if self.saved or self.finished or self.ending is not None:
            return
        log.info("[CHAT] Stopping turn %s on thread %s: %s", self.turn_id, self.spec.thread_id, code)
        self._conclude(events.error_event(code, message))
        self._decided.set()
        task = asyncio.ensure_future(self.interrupt())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def lease_was_lost(self, deleted: bool = False, unreachable: bool = False) -> None:
        """``on_lost`` of :func:`chat_app.leases.holding`: the thread was
        deleted, another worker took it, or (``unreachable``) the database
        stayed away until the lease ran out: the turn stops unsaved."""
        metrics.lease_lost(deleted)
        if deleted:  # the row went with its thread (deleted by another process)
            await self.abort("thread_deleted", DELETED)
            return
        if not self.saved:
            self._conclude(unsaved_error() if unreachable else events.error_event(
                "lease_lost", "this worker lost the thread's lease; the turn was stopped"))
        await self.interrupt()

    # --- events -------------------------------------------------------------------
    def _publish(self, event: dict) -> None:
        if event.get("type") == "text":
            self._mark("first_text")
        self.log.append(event)
        if event.get("type") == "session" and self._approval_event is not None:
            self.log.append(self._approval_event)  # a continuation: the decision right after
            self._approval_event = None

    def _chunk(self, message) -> None:
        """A ``chunk`` event for an SDK message, unless the client said ``chunks: false``."""
        if self.spec.chunks:
            self._publish(events.chunk_event(self.session_id, message))

    # --- the turn, start to end ------------------------------------------------------
    async def run(self, on_free) -> None:
        """The turn, ``ADMITTED`` to ``ENDED``. ``on_free(turn)`` is called
        once the process is given back and the lease let go, before the last
        event: a client may send its next message, to any worker, the
        moment it reads it (and find its warm client here)."""
        logs.bind_turn(self)  # every line of this task (and of those it starts) names the turn
        if self.spec.queued_event is not None:  # a queued message: its stream began with it
            self._publish(dict(self.spec.queued_event))
        try:
            async with leases.holding(self.lease, self.lease_was_lost) if self.lease is not None \
                    else contextlib.nullcontext():
                try:
                    await self._drive()
                finally:
                    self._enter(State.FINISHING)
                    await self._wind_down()
        finally:
            on_free(self)
            # Like a request's end: a turn runs outside any request, so close
            # its database connection if it is past CONN_MAX_AGE or broken
            # (done in the last save's trip when there was one).
            try:
                if not self.saved:
                    with contextlib.suppress(Exception):
                        await sync_to_async(close_old_connections)()
            finally:
                self._publish_ending()

    async def _drive(self) -> None:
        """Every state up to the last save; any failure becomes the ending."""
        spec = self.spec
        try:
            if spec.continuation is not None:
                run = await self._continue(spec.continuation)
            else:
                run = await self._first_run()
            while run.deferred is not None:  # a tool call waits for a person
                call = await self._await_decision(run.deferred)
                run = await self._continue(call)
            await self._finish(run)
        except Detached:
            self._conclude(events.error_event("turn_lost", DETACHED, retry_after=1))
        except (Stopped, ThreadDeleted) as exc:
            self._conclude(events.error_event("thread_deleted", str(exc) if isinstance(exc, ThreadDeleted)
                                              else DELETED))
        except ApiError as exc:
            self._conclude(events.error_event(exc.code, exc.message, exc.retry_after))
        except leases.LeaseLost as exc:
            log.error("[CHAT] %s", exc)
            self._conclude(events.error_event(
                "lease_lost", "this worker lost the thread's lease; the turn was stopped"))
        except ConnectionLost as exc:  # the last save waited for the database as long as the lease allowed
            log.error("[CHAT] Turn %s not saved, thread=%s: the database was unreachable: %s",
                      self.turn_id, spec.thread_id, exc)
            self._conclude(unsaved_error())
        except Exception:  # never leave a listener hanging
            log.exception("[CHAT] Turn %s failed thread=%s", self.turn_id, spec.thread_id)
            self._conclude(events.error_event(
                "turn_failed", f"the turn failed on the server (turn {self.turn_id}); see its log"))

    async def _wind_down(self) -> None:
        """``FINISHING`` after the last save (or without one): the process
        given back, a stopped turn's leftovers erased, the record of a turn
        that did not save one written."""
        ending = self._conclude(events.error_event("turn_failed", "the turn ended without a result"))
        reason = "stopped" if ending.stopped else "ended"
        if self._kept is not None and not self.saved:
            # A client stays warm only after its turn was saved: one whose
            # last save failed (the database away too long) holds a turn the
            # database does not, which the thread's next turn must not see.
            reason = "not saved"
        await self._free_process(reason)
        if not self.saved:  # a turn that did not end with its last save
            with contextlib.suppress(Exception):
                record = self._record(ending.outcome)
                metrics.turn_finished(record)
                await asyncio.shield(usage.record_turn(record))
        if ending.stopped and self.session_id is not None:
            # Its CLI may have written after the delete: leave nothing behind.
            await asyncio.shield(store.erase_if_orphaned(self.session_id))
        if self._queue_mark is not None:  # (a turn that ended without its last save)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._queue_mark)
        if self.spec.queue_id is not None and self.session_id is None and not ending.stopped:
            # A queued message whose turn ended before storing it: refused
            # (its stream's error), not run again by the thread's next kick.
            event = ending.event
            with contextlib.suppress(Exception):
                await asyncio.shield(sync_to_async(queued.mark_failed_sync)(
                    self.spec.queue_id, event.get("code", "turn_failed"), event.get("message", "")))

    def _publish_ending(self) -> None:
        if self.state is State.ENDED:
            return
        ending = self._conclude(events.error_event("turn_failed", "the turn ended without a result"))
        self._enter(State.ENDED)
        self.log.append(ending.event, last=True)

    def abandon(self) -> None:
        """The turn's task was cancelled before it ran (the loop closing):
        its process goes back, its listeners get its end; its lease lapses
        at its expiry."""
        if self.state is not State.ADMITTED:
            return
        if self.slot is not None:
            pool.discard(self.slot, "turn cancelled")
            self.slot = None
        self._enter(State.FINISHING)
        self._publish_ending()

    async def _free_process(self, reason: str) -> None:
        """Give the turn's process back to the pool: the one place it is.
        After a clean end its client stays warm for the thread's next turn;
        a stopped turn's client is closed (its context is deleted, or
        another worker's now)."""
        slot, kept = self.slot, self._kept
        self.slot = self._kept = None
        if kept is not None and reason != "ended":
            await asyncio.shield(pool.close(kept.client))
            kept = None
        if slot is None:
            return
        if kept is not None:
            pool.checkin(slot, self.spec.key, kept, agent=self.spec.agent,
                         session_id=self.session_id, version=self._version)
        else:
            pool.discard(slot, "turn did not end cleanly" if reason == "ended" else reason)

    # --- STARTING -> STREAMING ------------------------------------------------------
    async def _first_run(self) -> Run:
        spec = self.spec
        self._enter(State.STARTING)
        resuming = spec.resume_session_id and not spec.fork_from_thread_id
        if resuming:
            log.info("[CHAT] Resuming session: %s", spec.resume_session_id)
        if resuming and self.slot.kind != "warm":
            if self.lease is not None:
                await self.lease.check()  # nothing moves the session without it
            # The database is the truth: a session last written under
            # another working directory (another machine, data dir or
            # server) moves to this one's project key first, so the CLI
            # resumes it from the store and not from a stale local file.
            # (A warm client needs none of this: it is current. A fork
            # reads its parent where it is: see sdk.session_store.)
            await store.adopt_session(spec.resume_session_id)
        if spec.attachments:
            # The stored bytes read (and base64-encoded) off the event loop, once.
            self._content = await sync_to_async(attachments.message_content_sync, thread_sensitive=False)(
                spec.attachments, spec.message)
        try:
            return await self._converse(spec.resume_session_id)
        except ResumeMissing:
            notice = (
                f"The stored session {spec.resume_session_id} could not be resumed; "
                "a new session was started without the earlier context."
            )
            log.warning("[CHAT] %s thread=%s", notice, spec.thread_id)
            self._enter(State.STARTING)
            return await self._converse(None, notice=notice)

    async def _converse(self, resume: str | None, notice: str | None = None, *,
                        continuing: bool = False) -> Run:
        """One run of the CLI: send the message (or, ``continuing``, resume a
        session whose tool call was decided: the CLI asks for that call again
        and goes on) and stream its events."""
        spec = self.spec
        fork = bool(spec.fork_from_thread_id) and resume is not None and not continuing
        pending = []  # messages before the session id is known
        streamed: set[str] = set()
        reply = self._reply
        run = Run()
        warm = self.slot.take()  # the thread's warm client or a spare: connected already
        started = warm is None
        if started:
            context = ToolContext()
            options = build_options(
                spec.preset,
                resume=resume,
                fork=fork,
                resume_at=spec.at_message_uuid if fork else None,
                session_store=session_store(fork_of=resume if fork else None),
                context=context,
            )
            warm = WarmClient(ClaudeSDKClient(options), spec.agent, context=context)
        context = warm.context if warm.context is not None else ToolContext()
        # What this client's tools act for during this turn.
        context.caller = Caller(spec.resource_id, spec.thread_id, self.turn_id,
                                self.session_id or (None if fork else resume))
        context.publish = self._publish
        client = warm.client
        self._client = client
        # The person's messages its transcript store has committed so far:
        # this turn's is the next (none for a continuation, which sends none).
        transcripts = getattr(client.options, "session_store", None)
        prompts = (None if continuing or not hasattr(transcripts, "prompts_stored")
                   else transcripts.prompts)
        keep = hung = False
        try:
            if started:
                async with silence():
                    await pool.room()  # never more CLIs than the budget, exiting ones included
                    await client.connect()
            logs.bind(pid=warm.known_pid)  # the turn's log lines name its CLI
            self._stopped()
            if not continuing:
                if self._content is not None:  # attachments: one message of content blocks
                    await client.query(_one(user_message(self._content)))
                else:
                    await client.query(spec.message)
                self._mark("sent")
                if self._interrupted:  # asked for before the CLI was up
                    await client.interrupt()
            self._enter(State.STREAMING)
            async with contextlib.aclosing(until_silent(replies(client))) as messages:
                async for message in messages:
                    if not self._model and (model := events.init_model(message)):
                        self._model = model
                    if self.session_id is None:
                        sid = events.init_session_id(message)
                        if sid is None:
                            pending.append(message)
                            continue
                        self._mark("init")
                        if prompts is not None:
                            await self._message_stored(transcripts, prompts + 1)
                        await self._on_session(sid, resumed=resume is not None and not fork, notice=notice)
                        self._mark("session")
                        context.caller = Caller(spec.resource_id, spec.thread_id, self.turn_id, sid)
                        for earlier in pending:  # (a resumed session may answer a tool call first)
                            self._emit_text(earlier, streamed, reply)
                            await self._emit_tools(earlier, context)
                            self._chunk(earlier)
                    elif (sid := events.init_session_id(message)) and sid != self.session_id:
                        self.session_id = sid
                        context.caller = Caller(spec.resource_id, spec.thread_id, self.turn_id, sid)
                    self._emit_text(message, streamed, reply)
                    await self._emit_tools(message, context)
                    self._chunk(message)
                    if isinstance(message, ResultMessage):
                        run.result = message
                        self._count(message, warm)
                    elif isinstance(message, AssistantMessage) and message.error:
                        run.api_error = message.error
        except Silent:
            hung = True
            raise
        except ClaudeSDKError as exc:
            if self.session_id is None and MISSING_SESSION in str(exc) and resume and not continuing:
                raise ResumeMissing() from exc
            if run.result is None:  # after a result the CLI's non-zero exit adds nothing
                raise
        else:
            run.deferred = run.result.deferred_tool_use if run.result is not None else None
            # A client whose turn ended with its result (an interrupt included)
            # can take the thread's next turn; after an error it cannot, nor
            # after a deferred call: the session must be resumed to go on.
            keep = (run.result is not None and not run.result.is_error and self.ending is None
                    and run.deferred is None)
        finally:
            self._client = None
            context.caller = context.publish = None
            if keep:
                self._kept = warm
            else:
                await asyncio.shield(pool.close(client, kill=hung))
        self._stopped()
        if self.session_id is None:
            raise ApiError("the CLI ended without starting a session", code="turn_failed")
        return run

    # --- FINISHING: the last save ---------------------------------------------------------
    async def _finish(self, run: Run) -> None:
        """The turn's last save, in ONE trip to the database thread: the
        lease still ours (a worker that lost the thread saves nothing more),
        the mapping (with a follow-up's message), the turn's record and cost,
        the CLI's local copy dropped (unless the client stays warm), and the
        lease let go. Then the ending is concluded."""
        spec, result = self.spec, run.result
        self._enter(State.FINISHING)
        # A failed model call's "API Error" text is not a message of the thread.
        answered = result is not None and not result.is_error
        if result is not None and result.is_error and run.api_error in MODEL_UNAVAILABLE:
            # The model could not be reached (after the CLI's retries): the
            # stream's 503. The session and the user's message are kept. The
            # CLI's text may name the model's address: it goes to the log only.
            log.warning("[CHAT] Model unreachable, turn %s: %s", self.turn_id,
                        result.result or run.api_error)
            final = events.error_event(
                "model_unavailable", "the model could not be reached; try again shortly",
                retry_after=settings.OMNI_BUSY_RETRY_AFTER)
        elif result is not None:
            final = events.done_event(self.session_id, result, cost_usd=round(self._cost, 8),
                                      usage=dict(self._usage), duration_ms=self._elapsed_ms())
        else:
            final = events.error_event("turn_failed", "the turn ended without a result")
        self._stopped()
        if self._queue_mark is not None:  # before the lease goes: no sweep may run the row again
            await asyncio.shield(self._queue_mark)
        unsaved = self._message_unsaved
        record = self._record(Ending.of(final, interrupted=self._interrupted).outcome)
        await store.finish(
            spec, self.session_id, self.lease,
            user_message=spec.shown_text if unsaved else None, agent=spec.agent if unsaved else None,
            assistant_message="".join(self._reply) if answered else None,
            turn_record=record, drop_local=self._kept is None,
        )
        self._message_unsaved = False
        self.saved = True
        self._version = (self._version or 0) + 1
        metrics.turn_finished(record)
        self._conclude(final)

    def _mark(self, step: str) -> None:
        self.marks.setdefault(step, time.monotonic() - self._started)

    def _first_text_ms(self) -> int | None:
        first = self.marks.get("first_text")
        return None if first is None else int(first * 1000)

    # --- usage -----------------------------------------------------------------------------
    def _count(self, result: ResultMessage, warm: WarmClient) -> None:
        """Add a result's own tokens and cost (the difference from its
        process's total after its previous result) to the turn's."""
        total = float(result.total_cost_usd or 0.0)
        self._cost += max(0.0, total - warm.cost_total)
        warm.cost_total = total
        for kind, n in events.usage_of(result).items():
            self._usage[kind] += n

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def _record(self, outcome: str) -> dict:
        spec = self.spec
        return {
            "turn_id": self.turn_id, "resource_id": spec.resource_id, "thread_id": spec.thread_id,
            "agent": spec.agent, "model": self._model[:128], "started_at": self.started_at,
            "duration_ms": self._elapsed_ms(), "first_text_ms": self._first_text_ms(),
            "outcome": outcome[:64], "worker": WORKER,
            "input_tokens": self._usage["input_tokens"], "output_tokens": self._usage["output_tokens"],
            "cache_read_tokens": self._usage["cache_read_input_tokens"],
            "cache_write_tokens": self._usage["cache_creation_input_tokens"],
            "cost_usd": round(self._cost, 8),
        }

    async def _emit_tools(self, message, context: ToolContext) -> None:
        """``tool_use`` and ``tool_result`` events, and the calls' audit rows."""
        caller = context.caller
        if isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
            for block in message.content:
                if isinstance(block, ToolUseBlock):
                    self._publish(events.tool_use_event(block))
                    if caller is not None and self.session_id:
                        await calls.record_use(caller, self.session_id, block.id, block.name,
                                               block.input, block.name in context.approvals)
        elif isinstance(message, UserMessage) and message.parent_tool_use_id is None:
            content = message.content if isinstance(message.content, list) else []
            for block in content:
                if isinstance(block, ToolResultBlock):
                    event = events.tool_result_event(block)
                    self._publish(event)
                    if self.session_id:
                        await calls.record_result(self.session_id, block.tool_use_id, event["text"],
                                                  bool(block.is_error))

    # --- WAITING -> CONTINUING ------------------------------------------------------------
    async def _await_decision(self, deferred):
        """The CLI ended the turn at a tool call that needs a person's
        decision: hold no process while waiting, keep the thread (the lease
        is renewed), and return the decided call once this turn may go on."""
        call = await sync_to_async(calls.get_sync)(self.session_id, deferred.id)
        if call is None:
            raise ApiError("the tool call could not be kept for a decision", code="turn_failed")
        self._enter(State.WAITING)
        await self._free_process("waiting for a decision")  # no process while a person thinks
        if call.status == call.PENDING:
            # Announced now that the CLI has closed: the transcript with the call
            # is stored, so the request survives this worker from here on.
            self._publish(events.approval_request_event(call))
        while True:
            call = await calls.refresh(call)
            if call is None:  # gone with its thread
                raise Stopped("thread_deleted")
            if call.status != call.PENDING:
                break
            self._stopped()
            if self._detached or pool.stopping:  # the server stops: the call waits on
                raise Detached()
            if self._interrupted:  # Stop denies the waiting call; the turn ends normally
                self._interrupted = False
                await calls.decide(call, "deny", "interrupt", "the turn was interrupted")
                continue
            left = (call.expires_at - timezone.now()).total_seconds()
            if left <= 0:
                await calls.decide(call, "expired", "timeout")
                continue
            self._decided.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, DECISION_POLL_SECONDS)):
                    await self._decided.wait()
        self._stopped()
        return call

    async def _continue(self, call) -> Run:
        """Go on after ``call``'s decision: admitted again like any turn
        (budget, limits, a process: refused, the turn ends with that error
        and the call waits for the sweeper), the conversation claimed, then a
        cold client resumes the session: the CLI asks for the call again and
        the stored decision answers."""
        spec = self.spec
        self._enter(State.CONTINUING)
        if self.slot is None:
            await self._readmit(self)
        if not await calls.claim_continuation(call, self.turn_id):
            raise ApiError("another turn continues this conversation", code="turn_lost")
        call = await calls.refresh(call) or call
        log.info("[CHAT] Continuing thread %s after approval %s: %s (turn %s)",
                 spec.thread_id, call.approval_id, call.decision, self.turn_id)
        approval = events.approval_event(call)
        if self.session_id is not None:
            self._publish(approval)
        else:  # a turn started for it: right after its session event
            self._approval_event = approval
        if self.lease is not None:
            await self.lease.check()
        await store.adopt_session(call.session_id)
        return await self._converse(call.session_id, continuing=True)

    async def _message_stored(self, transcripts, count: int) -> None:
        """Wait until the turn's message is committed to the transcript
        store (the CLI writes it before calling the model; the SDK's eager
        flush stores it at once, usually before the session id comes):
        the ``session`` event, and a new thread's mapping, come after it, so
        a client that saw ``session`` knows the message survives any worker
        dying, and a mapping always names a session that resumes. Bounded:
        a store that cannot take it (the database away) delays the turn by
        :data:`MESSAGE_STORED_SECONDS` at most."""
        if not await transcripts.prompts_stored(count, MESSAGE_STORED_SECONDS):
            log.warning("[CHAT] The message of turn %s was not stored within %g s; going on",
                        self.turn_id, MESSAGE_STORED_SECONDS)

    async def _on_session(self, session_id: str, resumed: bool, notice: str | None) -> None:
        spec = self.spec
        self.session_id = session_id
        self._stopped()
        if self._version is None:
            self._version = spec.version
        if session_id == spec.resume_session_id and not spec.fork_from_thread_id:
            # A follow-up: the mapping exists and names this session already
            # (a turn cut short still resumes, and its transcript holds the
            # message): the message is counted in the turn's last save.
            self._message_unsaved = spec.message is not None
        else:
            # A new thread, a fork, or a fresh session: saved as soon as it is
            # known, so a turn cut short still resumes. Only a turn that found
            # no mapping may create one (its insert may find the thread taken).
            mapping = await store.save(
                spec, session_id, create=spec.new_thread,
                agent=spec.agent,
                user_message=spec.shown_text,
                forked_from_thread_id=spec.fork_from_thread_id,
            )
            self._version = mapping.version
        if spec.attachments or spec.fork_from_thread_id:
            # The message is stored: the thread carries its attachments (and
            # a fork its parent's), which are then never pruned as unsent.
            await sync_to_async(_record_uses_sync)(spec)
        if spec.queue_id is not None:  # the queued message is history now (written beside the
            # stream, not before its first text; the turn's end waits for it)
            self._queue_mark = asyncio.ensure_future(sync_to_async(queued.mark_started_sync)(spec.queue_id))
        self._publish(
            events.session_event(
                spec.thread_id, spec.resource_id, session_id, resumed,
                spec.forked_from_thread_id or spec.fork_from_thread_id, notice,
            )
        )

    def _emit_text(self, message, streamed: set[str], reply: list[str]) -> None:
        """Text events from the stream's deltas, or from a whole assistant
        message when none were streamed for it (e.g. a synthetic API error)."""
        if message_id := events.stream_message_id(message):
            self._streaming_id = message_id
        if (delta := events.text_delta(message)) is not None:
            streamed.add(self._streaming_id)
            reply.append(delta)
            self._publish(events.text_event(self.session_id, delta))
        elif (text := events.assistant_text(message)) and message.message_id not in streamed:
            reply.append(text)
            self._publish(events.text_event(self.session_id, text))


def user_message(content: list[dict]) -> dict:
    """The SDK's streaming-input form of one user message of content blocks."""
    return {"type": "user", "message": {"role": "user", "content": content},
            "parent_tool_use_id": None}


async def _one(message: dict):
    yield message


def _record_uses_sync(spec: TurnSpec) -> None:
    """A fork carries its parent's attachments; a message its own."""
    try:
        if spec.fork_from_thread_id:
            attachments.copy_uses_sync(spec.resource_id, spec.fork_from_thread_id, spec.thread_id)
        if spec.attachments:
            attachments.record_use_sync(spec.resource_id, spec.thread_id,
                                        [a.pk for a in spec.attachments])
    except IntegrityError:  # an attachment deleted meanwhile (its thread deleted)
        log.warning("attachments of thread %s changed while its turn ran", spec.thread_id)


class Detached(Exception):
    """The server stops while the turn waits for a decision."""


class ResumeMissing(Exception):
    """The stored session is gone (no local file, nothing in the store)."""


class Silent(ApiError):
    """The CLI sent nothing for ``OMNI_TURN_SILENCE_SECONDS``."""

    status, code = 504, "turn_timeout"


@contextlib.asynccontextmanager
async def silence():
    """A CLI that sends nothing for ``OMNI_TURN_SILENCE_SECONDS`` ends the
    turn with :class:`Silent` instead of holding it (and its thread) forever."""
    try:
        async with asyncio.timeout(settings.OMNI_TURN_SILENCE_SECONDS):
            yield
    except TimeoutError:
        raise silent() from None


def silent() -> Silent:
    return Silent(
        f"the Claude process sent nothing for {settings.OMNI_TURN_SILENCE_SECONDS:g} s; "
        "the turn was stopped"
    )


async def replies(client):
    """The client's messages up to its turn's ``ResultMessage`` (the SDK's
    ``receive_response``), each generator closed as the turn ends, not later
    by the event loop's async-generator finalizer (a cross-thread wake-up of
    the loop per generator)."""
    async with contextlib.aclosing(client.receive_messages()) as messages:
        async for message in messages:
            yield message
            if isinstance(message, ResultMessage):
                return


async def until_silent(messages):
    """``messages``, each within the silence timeout (:class:`Silent`
    otherwise); ``messages`` is closed when this generator is."""
    async with contextlib.aclosing(messages) as iterator:
        while True:
            try:
                async with asyncio.timeout(settings.OMNI_TURN_SILENCE_SECONDS):
                    message = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise silent() from None
            yield message
