"""A person's decision on a tool call, from any client on any worker, and the
conversation going on after it (contract §9).

The decision is stored first (:func:`sessions_app.toolcalls.decide_sync`: one
conditional update, so a second decision is ``409 already_decided``). Then
the turn that waits for it is woken: on this worker directly, on another one
through the channel layer (the turn's control group), and in any case a
waiting turn looks at its call every couple of seconds (workers without a
channel layer between them).

When no turn waits any more — the worker that started it was restarted or
killed, or stopped with the call pending — the *sweeper* continues the
conversation: every worker runs one (started with its first websocket,
chat request, decision or health check), which every
:data:`SWEEP_SECONDS` expires pending calls past ``OMNI_APPROVAL_TIMEOUT_SECONDS``
and, for a decided call that no turn has taken up while the thread's lease
is free (or held by a dead process of this host), takes the thread's lease
and starts a turn that resumes the session: the CLI asks for the call again,
the stored decision answers, and the reply streams to whoever follows the
thread. The lease makes sure only one worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from asgiref.sync import sync_to_async
from django.utils import timezone

from sessions_app.background import Background
from sessions_app.errors import ApiError, Conflict, NotFound, RateLimited, ServerBusy
from sessions_app.resources import resolve_resource

from . import streams
from .sdk import agent_preset
from sessions_app import toolcalls as calls
from .turns import TurnSpec, registry
from .turns.admission import CONTINUATION, admit

log = logging.getLogger("omni.chat")

SWEEP_SECONDS = 2.0


class AlreadyDecided(Conflict):
    code = "already_decided"


def decider_name(user, resource_id: str) -> str:
    if user is not None and getattr(user, "is_authenticated", False):
        return user.get_username()
    return resource_id


async def decide(user, body) -> dict:
    """Decide ``body.approvalId`` (an ``ApprovalIn``): 404 unknown or expired,
    403 another resource's, 409 ``already_decided``."""
    resource = resolve_resource(user, body.resourceId)
    call = await sync_to_async(calls.by_approval_sync)(body.approvalId)
    if call is None or call.resource_id != resource or call.thread_id != body.threadId:
        raise NotFound(f"no approval {body.approvalId!r} on thread {body.threadId!r}")
    if call.status == call.PENDING and call.expires_at <= timezone.now():
        await calls.decide(call, "expired", "timeout")
        call = await calls.refresh(call)
    if call.decision == "expired":
        raise NotFound(f"approval {body.approvalId!r} has expired: the call was not run")
    decided = await calls.decide(call, body.decision, decider_name(user, resource), body.message or "")
    if not decided:
        call = await calls.refresh(call)
        if call is not None and call.decision == "expired":
            raise NotFound(f"approval {body.approvalId!r} has expired: the call was not run")
        raise AlreadyDecided(f"approval {body.approvalId!r} was decided already"
                             + (f" ({call.decision} by {call.decided_by})" if call else ""))
    log.info("[CHAT] Approval %s: %s by %s (thread %s)", call.approval_id, body.decision,
             decider_name(user, resource), call.thread_id)
    await notify(call.turn_id)
    return {"approvalId": call.approval_id, "decision": body.decision}


async def notify(turn_id: str) -> None:
    """Wake the turn that waits on a decision, wherever it runs; when it
    does not wait here, this worker's sweeper looks at once (the turn may be
    gone: the sweeper continues the conversation; while it waits on another
    worker, the thread's lease keeps the sweeper off)."""
    if (turn := registry.by_id(turn_id)) is not None and not turn.finished:
        turn.wake()
        return
    await streams.send_to_turn(turn_id, {"type": "omni.decided"})
    if _kick is not None and _sweeper.running:
        _kick.set()


# --- the sweeper ---------------------------------------------------------------------

_kick: asyncio.Event | None = None  # set: the sweeper looks now, not after SWEEP_SECONDS


def start_sweeper() -> None:
    """Start this worker's sweeper (:func:`chat_app.lifecycle.startup`, once)."""
    global _kick
    if not _sweeper.running:
        _kick = asyncio.Event()
        _sweeper.start()


async def stop_sweeper() -> None:
    await _sweeper.stop()


async def _sweep_forever() -> None:
    kick = _kick
    while True:
        kick.clear()
        try:
            await sweep()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("approvals: a sweep failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SWEEP_SECONDS):
                await kick.wait()


_sweeper = Background(_sweep_forever)


async def sweep() -> list:
    """Expire overdue calls, and continue the decided calls no turn took up.
    Returns the turns it started."""
    if registry.draining:
        return []
    for call in await sync_to_async(calls.expire_due_sync)():
        log.info("[CHAT] Approval %s expired (thread %s)", call.approval_id, call.thread_id)
        await notify(call.turn_id)
    started = []
    for call in await sync_to_async(calls.waiting_sync)():
        owner = registry.by_id(call.turn_id)
        if owner is not None and not owner.finished:
            owner.wake()  # it waits here: it goes on itself
            continue
        if (running := registry.get(call.resource_id, call.thread_id)) is not None and not running.finished:
            continue
        turn = await _continue(call)
        if turn is not None:
            started.append(turn)
    return started


async def _continue(call):
    """Start a turn that goes on after ``call``'s decision, admitted like any
    turn (the thread's lease, the budget, the limits, a process); None if it
    may not start now (the sweeper tries again)."""
    agent, preset = agent_preset(None)
    spec = TurnSpec(call.resource_id, call.thread_id, None, agent, preset, new_thread=False,
                    continuation=call)
    try:
        turn = await admit(spec, CONTINUATION)
    except ApiError as exc:
        # Busy (its turn runs somewhere, or soon will be free), over the
        # budget or a limit, no process free: the call waits for a later sweep.
        level = logging.INFO if isinstance(exc, (Conflict, ServerBusy, RateLimited)) else logging.WARNING
        log.log(level, "[CHAT] Not continuing thread %s after approval %s yet: %s",
                call.thread_id, call.approval_id, exc.code)
        return None
    log.info("[CHAT] Continuing thread %s after approval %s on this worker (turn %s)",
             call.thread_id, call.approval_id, turn.turn_id)
    return turn
