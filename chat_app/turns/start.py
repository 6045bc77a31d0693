"""Starting a turn from a request: validate it, name its thread, admit it.

Both transports (SSE views, the websocket consumer) call :func:`start_turn`
and read the returned :class:`~chat_app.turns.runner.Turn`'s events. What a
turn must pass to start is :mod:`.admission`'s, the same for every kind.
"""

from __future__ import annotations

import uuid

from django.conf import settings

from sessions_app.errors import ApiError, TooLarge
from sessions_app.resources import resolve_resource

from .. import metrics
from ..sdk import agent_preset
from .admission import FORK, MESSAGE, admit
from .runner import TurnSpec


async def start_turn(user, body, *, fork: bool = False):
    """Start a chat or fork turn (a ``ChatIn``/``ForkIn``): the
    :class:`~chat_app.turns.runner.Turn`, or for a busy thread and ``ifBusy``
    ``enqueue``/``interrupt`` the queued message's
    :class:`~chat_app.queue.QueuedStream` (a fork's target is a new thread:
    it never queues).

    Raises the contract's errors: 400 unknown agent or fork point, 401/403
    from resource resolution, 404 fork parent missing, 409 fork target
    exists or thread busy (with ``Retry-After``), 413 message too long, 429
    over a limit or the day's budget, 503 ``server_busy``. Every refusal is
    counted in the metrics by its code (``omni_turns_refused_total``).
    """
    try:
        spec = _spec(user, body, fork=fork)
    except ApiError as exc:
        metrics.refused(exc.code)
        raise
    if_busy = getattr(body, "ifBusy", "reject")
    if fork or if_busy == "reject":
        return await admit(spec, FORK if fork else MESSAGE)
    from ..queue import submit  # above the turn pipeline: it imports this package

    return await submit(spec, if_busy, user)


def _spec(user, body, *, fork: bool) -> TurnSpec:
    if len(body.message) > settings.OMNI_MAX_MESSAGE_CHARS:
        raise TooLarge(f"message is over {settings.OMNI_MAX_MESSAGE_CHARS} characters")
    resource = resolve_resource(user, body.resourceId)
    agent, preset = agent_preset(body.agent)
    thread_id = body.threadId or f"thread-{uuid.uuid4().hex}"
    spec = TurnSpec(resource, thread_id, body.message, agent, preset, chunks=getattr(body, "chunks", True),
                    agent_given=body.agent is not None,
                    attachment_ids=list(getattr(body, "attachments", None) or ()))
    if fork:
        spec.fork_from_thread_id = body.forkFromThreadId
        spec.at_message_uuid = body.atMessageUuid
    return spec
