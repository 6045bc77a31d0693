"""The rows of a thread's queue (:class:`chat_app.models.QueuedMessage`):
every read and write of them, each a function run on the database thread.

The queue's behaviour (a stream that waits, starting the next turn, the
sweep) is :mod:`chat_app.queue`'s; the admission path (:mod:`.admission`)
and the turn (:mod:`.runner`) move a row along its states here:

* ``waiting``: queued (:func:`insert_sync`), or its turn's worker died
  before the message was stored;
* ``starting``: the admission path admitted its turn under the thread's
  lease (:func:`mark_starting_sync`, in the admission's trip);
* ``started``: the message is stored in the transcript (:func:`mark_started_sync`);
* ``cancelled`` (:func:`cancel_sync`) or ``failed`` (:func:`mark_failed_sync`:
  refused when it was to start, or its turn ended before storing it).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sessions_app.errors import RateLimited

from ..models import QueuedMessage

OPEN = QueuedMessage.OPEN


def new_queue_id() -> str:
    return f"q-{uuid.uuid4().hex}"


def _thread(resource_id: str, thread_id: str):
    return QueuedMessage.objects.filter(resource_id=resource_id, thread_id=thread_id)


class QueueFull(RateLimited):
    code = "queue_full"


def insert_sync(spec, mode: str, created_by: str) -> QueuedMessage:
    """Queue ``spec``'s message on its thread (429 ``queue_full`` when
    ``OMNI_MAX_QUEUED_PER_THREAD`` wait already). An ``interrupt`` goes
    before every ``enqueue`` (after earlier interrupts). Its ``position``:
    how many run before it, plus one."""
    interrupt = mode == QueuedMessage.INTERRUPT
    limit = settings.OMNI_MAX_QUEUED_PER_THREAD
    with transaction.atomic():
        waiting = list(_thread(spec.resource_id, spec.thread_id).filter(state__in=OPEN)
                       .values_list("priority", flat=True))
        if len(waiting) >= limit:
            raise QueueFull(f"{limit} messages already wait on thread {spec.thread_id!r}; "
                            "wait for one to run or cancel one", retry_after=settings.OMNI_BUSY_RETRY_AFTER)
        ahead = sum(1 for p in waiting if p == 0) if interrupt else len(waiting)
        return QueuedMessage.objects.create(
            queue_id=new_queue_id(), resource_id=spec.resource_id, thread_id=spec.thread_id,
            turn_id=spec.turn_id, message=spec.message or "", attachment_ids=list(spec.attachment_ids),
            agent=spec.agent if spec.agent_given else "", chunks=spec.chunks, mode=mode,
            priority=0 if interrupt else 1, position=ahead + 1, created_by=created_by[:150],
            created_at=timezone.now())


def head_sync(resource_id: str, thread_id: str) -> QueuedMessage | None:
    """The thread's next message to run: the first open row in order."""
    return _thread(resource_id, thread_id).filter(state__in=OPEN).order_by("priority", "id").first()


def mark_starting_sync(row: QueuedMessage) -> None:
    QueuedMessage.objects.filter(pk=row.pk).update(state=QueuedMessage.STARTING, started_at=timezone.now())


def mark_started_sync(queue_id: str) -> None:
    """The message is stored in the thread's transcript: it is history now."""
    QueuedMessage.objects.filter(queue_id=queue_id, state__in=OPEN).update(
        state=QueuedMessage.STARTED, ended_at=timezone.now())


def mark_failed_sync(queue_id: str, code: str, message: str) -> bool:
    """Refused when its turn was to start (or its turn ended before storing
    the message): the stream's ``error``. False if it had moved on."""
    return bool(QueuedMessage.objects.filter(queue_id=queue_id, state__in=OPEN).update(
        state=QueuedMessage.FAILED, ended_at=timezone.now(), error_code=code[:64], error_message=message))


def cancel_sync(resource_id: str, thread_id: str, queue_id: str) -> bool:
    """Cancel a message still waiting: False once its turn started (or unknown)."""
    return bool(_thread(resource_id, thread_id).filter(queue_id=queue_id, state=QueuedMessage.WAITING).update(
        state=QueuedMessage.CANCELLED, ended_at=timezone.now(), error_code="cancelled"))


def get_sync(queue_id: str) -> QueuedMessage | None:
    return QueuedMessage.objects.filter(queue_id=queue_id).first()


def by_turn_sync(resource_id: str, thread_id: str, turn_id: str) -> QueuedMessage | None:
    """The thread's queued message whose turn will be ``turn_id``."""
    return _thread(resource_id, thread_id).filter(turn_id=turn_id).first()


def waiting_sync(resource_id: str, thread_id: str) -> list[QueuedMessage]:
    """The thread's queue in order: the messages whose turn has not started."""
    return list(_thread(resource_id, thread_id).filter(state=QueuedMessage.WAITING).order_by("priority", "id"))


def depth_sync() -> int:
    """Messages waiting, on every thread (``omni_queue_depth``)."""
    return QueuedMessage.objects.filter(state=QueuedMessage.WAITING).count()


def orphaned_threads_sync(limit: int = 100) -> list[tuple[str, str]]:
    """Threads with open rows that no live turn holds (no live lease, or
    one of a process of this host that died), oldest first: the sweep's
    work. A thread whose tool call waits for a decision is left to the turn
    that goes on after it (its end starts the queue): trying it would take
    and give back its lease at every sweep. Three queries, however many
    threads."""
    from sessions_app import selectors

    from .. import leases
    from ..models import ThreadLease

    keys: dict[tuple[str, str], None] = {}
    for key in (QueuedMessage.objects.filter(state__in=OPEN).order_by("id")
                .values_list("resource_id", "thread_id")[:limit * 10]):
        keys.setdefault(key, None)
        if len(keys) >= limit:
            break
    if not keys:
        return []
    live = ThreadLease.objects.filter(
        thread_id__in={thread for _, thread in keys}, expires_at__gt=timezone.now())
    held = {(row.resource_id, row.thread_id) for row in live if not leases.holder_is_dead(row)}
    free = [key for key in keys if key not in held]
    deciding = selectors.waiting_for_decision_sync(free)
    return [key for key in free if key not in deciding]


def prune_ended_sync(older_than: float) -> int:
    """Delete rows that ended ``older_than`` seconds ago (every waiting
    stream has learnt their outcome by then)."""
    cutoff = timezone.now() - timedelta(seconds=older_than)
    return QueuedMessage.objects.exclude(state__in=OPEN).filter(ended_at__lt=cutoff).delete()[0]


def delete_thread_sync(resource_id: str, thread_id: str) -> int:
    """The thread is deleted: its queue goes (its waiting streams end with an error)."""
    return _thread(resource_id, thread_id).delete()[0]
