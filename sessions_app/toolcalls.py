"""The tool calls of turns, and the decisions on them, in the database
(:class:`sessions_app.models.ToolCall`): the audit trail and the state an
approval lives in, shared by every worker and surviving any of them.

Every change that decides something is one conditional ``UPDATE`` (``WHERE
status = ...``), so two deciders, two continuations or two executions of one
call cannot both win: a call is decided once, continued once, and run at
most once.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import services
from .models import SessionMapping, ToolCall
from .signals import tool_call_decided

RESULT_CHARS = 2000
INPUT_CHARS = 20_000


def _json(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= INPUT_CHARS else json.dumps({"truncated": text[:INPUT_CHARS]})


def approval_timeout() -> timedelta:
    return timedelta(seconds=float(settings.OMNI_APPROVAL_TIMEOUT_SECONDS))


# --- a call is seen ---------------------------------------------------------------

def _ensure(caller, session_id: str, tool_use_id: str, tool: str, tool_input: dict,
            needs_approval: bool) -> ToolCall | None:
    """The call's row, created on first sight (None: the thread is gone)."""
    call = ToolCall.objects.filter(session_id=session_id, tool_use_id=tool_use_id).first()
    if call is not None:
        return call
    mapping = SessionMapping.objects.filter(
        resource_id=caller.resource_id, thread_id=caller.thread_id).first()
    if mapping is None:
        return None
    now = timezone.now()
    try:
        with transaction.atomic():
            return ToolCall.objects.create(
                mapping=mapping, resource_id=caller.resource_id, thread_id=caller.thread_id,
                turn_id=caller.turn_id, session_id=session_id, tool_use_id=tool_use_id, tool=tool,
                input=_json(tool_input), needs_approval=needs_approval,
                status=ToolCall.PENDING if needs_approval else ToolCall.RUNNING,
                started_at=None if needs_approval else now)
    except IntegrityError:  # seen by the hook and the stream at once
        return ToolCall.objects.filter(session_id=session_id, tool_use_id=tool_use_id).first()


def record_use_sync(caller, session_id, tool_use_id, tool, tool_input, needs_approval) -> ToolCall | None:
    return _ensure(caller, session_id, tool_use_id, tool, tool_input, needs_approval)


async def record_use(*args) -> ToolCall | None:
    return await sync_to_async(record_use_sync)(*args)


def open_approval_sync(caller, session_id: str, tool_use_id: str, tool: str,
                       tool_input: dict) -> ToolCall | None:
    """The call waits for a person: give it an approval id and an expiry (once),
    and mark its thread busy. None: the thread is gone."""
    call = _ensure(caller, session_id, tool_use_id, tool, tool_input, True)
    if call is None or call.status != ToolCall.PENDING:
        return call
    if call.approval_id is None:
        expires = timezone.now() + approval_timeout()
        ToolCall.objects.filter(pk=call.pk, approval_id__isnull=True).update(
            approval_id=secrets.token_hex(16), expires_at=expires, turn_id=caller.turn_id)
        call.refresh_from_db()
    services.mark_pending_approval(call.thread_id, call.resource_id, call.approval_id)
    return call


async def open_approval(*args) -> ToolCall | None:
    return await sync_to_async(open_approval_sync)(*args)


def get_sync(session_id: str, tool_use_id: str) -> ToolCall | None:
    return ToolCall.objects.filter(session_id=session_id, tool_use_id=tool_use_id).first()


def by_approval_sync(approval_id: str) -> ToolCall | None:
    return ToolCall.objects.filter(approval_id=approval_id).first()


async def refresh(call: ToolCall) -> ToolCall | None:
    return await ToolCall.objects.filter(pk=call.pk).afirst()


# --- decisions ---------------------------------------------------------------------

def decide_sync(call: ToolCall, decision: str, by: str, message: str = "") -> bool:
    """Decide a pending call (``allow``, ``deny`` or ``expired``); False if it
    was decided already (or has expired, for ``allow``/``deny``)."""
    now = timezone.now()
    rows = ToolCall.objects.filter(pk=call.pk, status=ToolCall.PENDING)
    if decision != "expired":
        rows = rows.filter(expires_at__gt=now)
    # The thread stays marked busy until a turn continues after the decision.
    decided = rows.update(status=ToolCall.DECIDED, decision=decision, decided_by=by[:150],
                          decided_at=now, decision_message=message[:2000]) == 1
    if decided:  # once per call, wherever it was decided (a person, Stop, the timeout)
        tool_call_decided.send(sender=ToolCall, decision=decision)
    return decided


async def decide(call: ToolCall, decision: str, by: str, message: str = "") -> bool:
    return await sync_to_async(decide_sync)(call, decision, by, message)


def expire_due_sync() -> list[ToolCall]:
    """Expire every pending call past its ``expires_at`` (any worker may)."""
    due = list(ToolCall.objects.filter(status=ToolCall.PENDING, expires_at__lte=timezone.now()))
    return [call for call in due if decide_sync(call, "expired", "timeout")]


def waiting_sync(limit: int = 50) -> list[ToolCall]:
    """Decided calls no turn continues yet."""
    return list(ToolCall.objects.filter(status=ToolCall.DECIDED, continued_by__isnull=True)
                .order_by("decided_at")[:limit])


def claim_continuation_sync(call: ToolCall, turn_id: str) -> bool:
    """This turn continues the conversation after ``call``'s decision (once)."""
    claimed = ToolCall.objects.filter(pk=call.pk, status=ToolCall.DECIDED, continued_by__isnull=True).update(
        continued_by=turn_id) == 1
    if claimed:  # the thread no longer waits on it
        services.mark_pending_approval(call.thread_id, call.resource_id, None, only_if=call.approval_id)
    return claimed


async def claim_continuation(call: ToolCall, turn_id: str) -> bool:
    return await sync_to_async(claim_continuation_sync)(call, turn_id)


def claim_run_sync(session_id: str, tool_use_id: str) -> ToolCall | None:
    """An allowed call is about to run: mark it running, once. None: it may not
    (not allowed, or it ran already): fail closed."""
    now = timezone.now()
    done = ToolCall.objects.filter(session_id=session_id, tool_use_id=tool_use_id, status=ToolCall.DECIDED,
                                   decision="allow").update(status=ToolCall.RUNNING, started_at=now)
    return get_sync(session_id, tool_use_id) if done else None


def refuse_sync(session_id: str, tool_use_id: str) -> None:
    """A denied or expired call was answered to the model: it never runs."""
    ToolCall.objects.filter(session_id=session_id, tool_use_id=tool_use_id, status=ToolCall.DECIDED).exclude(
        decision="allow").update(status=ToolCall.REFUSED, finished_at=timezone.now())


def record_result_sync(session_id: str, tool_use_id: str, text: str, is_error: bool) -> None:
    call = get_sync(session_id, tool_use_id)
    if call is None:
        return
    now = timezone.now()
    changes = {"result": text[:RESULT_CHARS], "is_error": bool(is_error), "finished_at": now}
    if call.status == ToolCall.RUNNING:
        changes["status"] = ToolCall.ERROR if is_error else ToolCall.DONE
        if call.started_at:
            changes["duration_ms"] = int((now - call.started_at).total_seconds() * 1000)
    elif call.status in (ToolCall.DECIDED, ToolCall.PENDING):
        changes["status"] = ToolCall.REFUSED  # answered without running (denied, expired, failed closed)
    ToolCall.objects.filter(pk=call.pk).update(**changes)


async def record_result(*args) -> None:
    await sync_to_async(record_result_sync)(*args)


def pending_for_thread_sync(resource_id: str, thread_id: str) -> ToolCall | None:
    """The thread's call that waits (for a decision, or for its continuation);
    None, and the thread's mark cleared, when none does."""
    call = (ToolCall.objects.filter(resource_id=resource_id, thread_id=thread_id)
            .filter(status__in=(ToolCall.PENDING, ToolCall.DECIDED), continued_by__isnull=True)
            .order_by("created_at").first())
    if call is None:
        services.mark_pending_approval(thread_id, resource_id, None)
    return call
