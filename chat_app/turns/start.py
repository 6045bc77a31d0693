"""Starting a turn: validate, take the thread, check the limits, run.

Both transports (SSE views, the websocket consumer) call :func:`start_turn`
and read the returned :class:`~chat_app.turns.runner.Turn`'s events.
"""

from __future__ import annotations

import asyncio
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from sessions_app import services, usage
from sessions_app.errors import ApiError, Conflict, NotFound, ServerBusy, TooLarge
from sessions_app.resources import resolve_resource

from .. import leases, limits, metrics
from ..sdk import agent_preset
from ..tools import calls
from . import store
from .registry import registry
from .runner import Turn, TurnSpec


async def start_turn(user, body, *, fork: bool = False) -> Turn:
    """Start a chat or fork turn (:func:`_start_turn`); a refusal is counted
    in the metrics by its code (``omni_turns_refused_total``)."""
    try:
        return await _start_turn(user, body, fork=fork)
    except ApiError as exc:
        metrics.refused(exc.code)
        raise


async def _start_turn(user, body, *, fork: bool = False) -> Turn:
    """Validate a chat or fork request (a ``ChatIn``/``ForkIn``), and start it.

    Raises the contract's errors: 400 unknown agent, 401/403 from resource
    resolution, 404 fork parent missing, 409 fork target exists or thread
    busy (with ``Retry-After``), 413 message too long, 429 over a limit or
    the day's budget, 503 ``server_busy``.
    """
    if len(body.message) > settings.OMNI_MAX_MESSAGE_CHARS:
        raise TooLarge(f"message is over {settings.OMNI_MAX_MESSAGE_CHARS} characters")
    resource = resolve_resource(user, body.resourceId)
    agent, preset = agent_preset(body.agent)
    thread_id = body.threadId or f"thread-{uuid.uuid4().hex}"
    spec = TurnSpec(resource, thread_id, body.message, agent, preset, chunks=getattr(body, "chunks", True))
    if registry.draining:
        raise ServerBusy("the server is shutting down; try again (another worker will answer)",
                         retry_after=1)
    if running := registry.get(resource, thread_id):
        raise leases.busy_error(thread_id, running.retry_after())
    if fork:  # the cheap refusals first: no lease row for a fork that cannot be
        await _check_fork(spec, body)
        await usage.check_budget(resource)  # 429 budget_exceeded, across workers (the database)
        # One turn per thread across every process, from here to the turn's end:
        # the checks below and everything the turn does to the stored session.
        lease = await leases.acquire(resource, thread_id, spec.turn_id)
        admission = None
    else:
        # A message: the lease, the thread, its waiting calls, the budget and
        # the limits in ONE trip to the database thread (the warm path).
        backend = limits.backend()
        local = isinstance(backend, limits.DatabaseBackend)
        lease, admission = await sync_to_async(_begin_sync)(spec, body, backend if local else None)
    try:
        if fork:
            await _resolve_thread(spec, body, fork=True)
        if admission is None:
            admission = await limits.admit(resource, spec.turn_id)  # 429 rate_limited
        try:
            return registry.start(spec, lease)
        except BaseException:
            await asyncio.shield(admission.cancel())  # it did not start: it does not count
            raise
    except BaseException:
        await asyncio.shield(lease.discard())  # refused: the thread as it was, no new row
        raise


def _begin_sync(spec: TurnSpec, body, backend) -> tuple:
    """A message's checks under its new lease, in one trip: the lease (409),
    the thread's mapping, a call of it waiting for a decision (409), the
    budget (429) and, with the database backend, the limits (429). A refusal
    gives the lease back (no row left for a thread that never ran)."""
    taken = leases.acquire_sync(spec.resource_id, spec.thread_id, spec.turn_id)
    if isinstance(taken, leases.Busy):
        raise leases.busy_error(spec.thread_id, taken.retry_after)
    try:
        mapping = services.turn_mapping_sync(spec.thread_id, spec.resource_id)
        if mapping is not None:
            if mapping.pending_approval_id:
                _check_waiting_call_sync(spec, spec.thread_id)
            _resume(spec, mapping, body)
        usage.check_budget_sync(spec.resource_id)
        admission = backend.admit_sync(spec.resource_id, spec.turn_id) if backend is not None else None
    except BaseException:
        taken.discard_sync()
        raise
    return taken, admission


def _resume(spec: TurnSpec, mapping, body) -> None:
    """The thread exists: the turn resumes its session."""
    spec.new_thread = False
    spec.resume_session_id = mapping.session_id
    spec.forked_from_thread_id = mapping.forked_from_thread_id
    spec.version = mapping.version
    if body.agent is None:
        spec.agent, spec.preset = agent_preset(mapping.agent)


def _check_waiting_call_sync(spec: TurnSpec, thread_id: str) -> None:
    call = calls.pending_for_thread_sync(spec.resource_id, thread_id)
    if call is None:
        return
    if call.status == call.PENDING and call.expires_at is not None:
        left = (call.expires_at - timezone.now()).total_seconds()
        if left > 0:
            raise leases.busy_error(thread_id, left)
        calls.decide_sync(call, "expired", "timeout")
    raise leases.busy_error(thread_id, 2)  # the conversation goes on after the decision first


async def _check_waiting_call(spec: TurnSpec, thread_id: str | None = None) -> None:
    """409 ``thread_busy`` while a tool call of the thread waits for a person's
    decision, or for the turn that goes on after it (a new message must not
    run into that continuation)."""
    await sync_to_async(_check_waiting_call_sync)(spec, thread_id or spec.thread_id)


async def _check_fork(spec: TurnSpec, body) -> None:
    """404 for a missing parent, 409 for a taken target (checked again under
    the lease, which is what makes it exact), 409 ``thread_busy`` for a parent
    whose tool call waits for a decision."""
    parent = await services.get_mapping(body.forkFromThreadId, spec.resource_id)
    if parent is None:
        raise NotFound(f"no thread {body.forkFromThreadId!r} to fork from")
    if parent.pending_approval_id:
        await _check_waiting_call(spec, parent.thread_id)
    if await services.get_mapping(spec.thread_id, spec.resource_id):
        raise Conflict(f"thread {spec.thread_id!r} already exists", code="thread_exists")


async def _resolve_thread(spec: TurnSpec, body, *, fork: bool) -> None:
    """What the turn resumes: the fork parent's session or the thread's own."""
    resource, thread_id = spec.resource_id, spec.thread_id
    if fork:
        parent = await services.get_mapping(body.forkFromThreadId, resource)
        if parent is None:
            raise NotFound(f"no thread {body.forkFromThreadId!r} to fork from")
        if await services.get_mapping(thread_id, resource):
            raise Conflict(f"thread {thread_id!r} already exists", code="thread_exists")
        spec.resume_session_id = parent.session_id
        spec.fork_from_thread_id = parent.thread_id
        spec.at_message_uuid = await store.fork_point(parent.session_id, body.atMessageUuid)
    elif mapping := await services.get_mapping(thread_id, resource):
        if mapping.pending_approval_id:
            await _check_waiting_call(spec)
        _resume(spec, mapping, body)

