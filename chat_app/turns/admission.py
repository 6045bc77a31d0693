"""The one admission path: every turn starts here, whatever starts it.

A message and a fork (:mod:`.start`, both transports), a conversation going
on after a tool call's decision (the sweeper, :mod:`chat_app.approvals`, or
the waiting turn itself: :func:`readmit`), and the kinds of turn still to
come (queued, edited, regenerated) all pass :func:`admit`, in this order:

1. this process takes turns (not draining) and runs none on the thread;
2. the thread's **lease** (``409 thread_busy``), one turn per thread across
   every process;
3. the kind's own checks under the lease (:class:`Kind`: the thread's
   mapping and what the turn resumes, a call of it waiting for a decision,
   a fork's parent and target);
4. the day's **budget** (``429 budget_exceeded``);
5. the **limits** (``429 rate_limited``), counted across workers;
6. a **process** from the pool (``503 server_busy``), and the turn runs.

2–5 are one trip to the database thread (with the database limits backend:
the warm path's checks in one trip). A refusal at any step is counted in the
metrics by its code (``omni_turns_refused_total``), gives the lease back (a
row this take created is deleted) and uncounts the start: nothing is left of
a turn that did not start.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from sessions_app import selectors, services, usage
from sessions_app import toolcalls as calls
from sessions_app.attachments import services as attachments
from sessions_app.errors import ApiError, BadRequest, Conflict, NotFound, ServerBusy, TooLarge

from .. import leases, limits, metrics, sql
from ..pool import pool
from ..sdk import agent_preset
from . import queued
from .registry import registry
from .runner import Turn, TurnSpec


@dataclass
class Kind:
    """What a kind of turn checks under the lease, before the budget:
    ``check_sync(spec)`` runs on the database thread, raises the kind's
    refusals and fills in what the turn resumes; it may return the
    resource's budget state when it read it in the same statement (a
    message: the warm path's reads in one ``SELECT``)."""

    name: str
    check_sync: Callable[[TurnSpec], object]
    # A refusal for a busy thread is counted in the metrics (a person saw
    # it); a continuation the sweeper tries again in moments is not.
    count_busy: bool = True


async def admit(spec: TurnSpec, kind: Kind) -> Turn:
    """Admit a new turn (see the module doc) and start it."""
    lease, slot = await _admitted(spec, kind)
    return registry.start(Turn(spec, slot, lease, readmit=readmit))


async def readmit(turn: Turn) -> None:
    """A waiting turn goes on after a decision: the same steps as any turn
    under the lease it holds (the thread's mapping, the budget, the limits, a
    process). Refused, the turn ends with that error and the decided call
    waits for the sweeper (on any worker)."""
    _, turn.slot = await _admitted(turn.spec, CONTINUATION, held=turn.lease)


async def _admitted(spec: TurnSpec, kind: Kind, held: leases.Lease | None = None) -> tuple:
    """Steps 1-6 in order (step 1 and the lease's take only for a new turn,
    ``held`` is None): the lease and a process. A refusal is counted, gives
    back a lease taken here and uncounts the start."""
    try:
        if held is None:
            if registry.draining:
                raise ServerBusy("the server is shutting down; try again (another worker will answer)",
                                 retry_after=1)
            if running := registry.get(spec.resource_id, spec.thread_id):
                raise leases.busy_error(spec.thread_id, running.retry_after())
        backend = limits.backend()
        inline = backend if isinstance(backend, limits.DatabaseBackend) else None
        lease, admission = await sync_to_async(_admit_sync)(spec, kind, inline, lease=held)
        try:
            if admission is None:
                admission = await limits.admit(spec.resource_id, spec.turn_id)
            try:
                return lease, _process(spec)
            except BaseException:
                await asyncio.shield(admission.cancel())  # it did not start: it does not count
                raise
        except BaseException:
            if held is None:
                await asyncio.shield(lease.discard())  # refused: the thread as it was, no new row
            raise
    except ApiError as exc:
        if kind.count_busy or exc.code != "thread_busy":
            metrics.refused(exc.code)
        raise


def _admit_sync(spec: TurnSpec, kind: Kind, backend, lease: leases.Lease | None = None) -> tuple:
    """Steps 2-5 in one trip: the lease (unless the turn holds it), the
    kind's checks, the budget and, with the database backend, the limits."""
    taken = None
    if lease is None:
        taken = leases.acquire_sync(spec.resource_id, spec.thread_id, spec.turn_id)
        if isinstance(taken, leases.Busy):
            raise leases.busy_error(spec.thread_id, taken.retry_after)
    try:
        budget = kind.check_sync(spec)
        usage.check_budget_sync(spec.resource_id, budget)
        admission = backend.admit_sync(spec.resource_id, spec.turn_id) if backend is not None else None
    except BaseException:
        if taken is not None:
            taken.discard_sync()
        raise
    return taken or lease, admission


def _process(spec: TurnSpec):
    """Step 6: the process for the turn (synchronous: deciding and
    reserving cannot race). A fork, or a continuation after a decision,
    starts its own CLI."""
    return pool.checkout(
        spec.key, agent=spec.agent, session_id=spec.resume_session_id, version=spec.version,
        fork=bool(spec.fork_from_thread_id) or spec.continuation is not None)


# --- the kinds' checks -----------------------------------------------------------------

def _message_sync(spec: TurnSpec):
    """A message: the thread's mapping (it resumes its session), and 409
    while a call of it waits for a decision or for its continuation, or
    while messages wait in its queue (this one would jump them). The
    mapping and the budget's state are one ``SELECT``."""
    attachments_sync(spec)
    return _mapping_sync(spec, queue_first=True)


def _queued_sync(spec: TurnSpec):
    """A queued message's turn (:mod:`chat_app.queue`): the thread's next
    in its queue (else 409: another is first, or it was cancelled), then a
    message's checks; its row moves to ``starting`` in the same trip."""
    head = queued.head_sync(spec.resource_id, spec.thread_id)
    if head is None or head.queue_id != spec.queue_id:
        raise leases.busy_error(spec.thread_id, 1)
    attachments_sync(spec)
    budget = _mapping_sync(spec)
    queued.mark_starting_sync(head)
    return budget


def _mapping_sync(spec: TurnSpec, queue_first: bool = False):
    """The thread's mapping and the budget's state in one ``SELECT`` (with
    ``queue_first``, also whether messages wait in its queue: then 409)."""
    also = functools.partial(sql.queue_open_expression, resource_id=spec.resource_id,
                             thread_id=spec.thread_id) if queue_first else None
    mapping, budget, *waiting = selectors.turn_mapping_and_budget_sync(spec.thread_id, spec.resource_id, also)
    if waiting and waiting[0]:
        raise leases.busy_error(spec.thread_id, 1)
    if mapping is not None:
        if mapping.pending_approval_id:
            _check_waiting_call_sync(spec.resource_id, spec.thread_id)
        _resume(spec, mapping, keep_agent=spec.agent_given)
    return budget


def _fork_sync(spec: TurnSpec) -> None:
    """A fork: 404 for a missing parent, 409 ``thread_busy`` for a parent
    whose call waits for a decision, 409 ``thread_exists`` for a taken
    target (exact: under the target's lease), 400 for a cut that is not a
    message of the parent."""
    attachments_sync(spec)
    parent = selectors.turn_mapping_sync(spec.fork_from_thread_id, spec.resource_id)
    if parent is None:
        raise NotFound(f"no thread {spec.fork_from_thread_id!r} to fork from")
    if parent.pending_approval_id:
        _check_waiting_call_sync(spec.resource_id, spec.fork_from_thread_id)
    if selectors.turn_mapping_sync(spec.thread_id, spec.resource_id) is not None:
        raise Conflict(f"thread {spec.thread_id!r} already exists", code="thread_exists")
    spec.resume_session_id = parent.session_id
    if spec.at_message_uuid is not None and settings.OMNI_SESSION_STORE:
        from sessions_app.transcripts import fork_cut, main_transcript

        cut = fork_cut(main_transcript(parent.session_id), spec.at_message_uuid)
        if cut is None:
            raise BadRequest(f"atMessageUuid {spec.at_message_uuid!r} is not a message of the "
                             "thread being forked")
        spec.at_message_uuid = cut


def _continuation_sync(spec: TurnSpec) -> None:
    """Going on after a decision: the thread still exists. A turn started
    for it (``spec.continuation``) resumes the call's session with the
    thread's agent as it is now; a waiting turn goes on with its own."""
    mapping = selectors.turn_mapping_sync(spec.thread_id, spec.resource_id)
    if mapping is None:
        raise services.ThreadDeleted(f"thread {spec.thread_id!r} was deleted")
    if spec.continuation is not None:
        _resume(spec, mapping, keep_agent=False)
        spec.resume_session_id = spec.continuation.session_id


def attachments_sync(spec: TurnSpec) -> None:
    """The message's attachments (contract §11), looked up once: each the
    resource's own upload (404 otherwise), their bytes together within
    ``OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES`` (413). None named: no query."""
    if not spec.attachment_ids:
        return
    found = attachments.resolve_sync(spec.resource_id, spec.attachment_ids)
    total = sum(a.size for a in found)
    if total > settings.OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES:
        raise TooLarge(f"the message's attachments hold {total} bytes, over the "
                       f"{settings.OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES} a message may carry",
                       code="attachments_too_large")
    spec.attachments = found


MESSAGE = Kind("message", _message_sync)
# A message with ifBusy enqueue or interrupt: a busy thread queues it, uncounted.
MESSAGE_OR_QUEUE = Kind("message", _message_sync, count_busy=False)
QUEUED = Kind("queued", _queued_sync, count_busy=False)
FORK = Kind("fork", _fork_sync)
CONTINUATION = Kind("continuation", _continuation_sync, count_busy=False)


def _resume(spec: TurnSpec, mapping, *, keep_agent: bool) -> None:
    """The thread exists: the turn resumes its session."""
    spec.new_thread = False
    spec.resume_session_id = mapping.session_id
    spec.forked_from_thread_id = mapping.forked_from_thread_id
    spec.version = mapping.version
    if not keep_agent:
        spec.agent, spec.preset = agent_preset(mapping.agent)


def _check_waiting_call_sync(resource_id: str, thread_id: str) -> None:
    call = calls.pending_for_thread_sync(resource_id, thread_id)
    if call is None:
        return
    if call.status == call.PENDING and call.expires_at is not None:
        left = (call.expires_at - timezone.now()).total_seconds()
        if left > 0:
            raise leases.busy_error(thread_id, left)
        calls.decide_sync(call, "expired", "timeout")
    raise leases.busy_error(thread_id, 2)  # the conversation goes on after the decision first
