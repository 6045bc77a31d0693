"""What the chat app does when the session service deletes threads."""

from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from sessions_app.selectors import mapping_of

from . import leases, metrics, streams
from .models import ThreadLease
from .turns import queued


async def thread_deleted(sender, thread_id, resource_id, **kwargs):
    """A deleted thread leaves nothing running or holding it: its running turn
    stops on whichever worker runs it (saving nothing, so the thread is never
    brought back), every worker's warm client of it closes, and its lease row
    goes, and so does its queue (each queued message's stream ends with an
    ``error``). Without a channel layer reaching other workers (or from a
    management command), the lease row's deletion stops a turn elsewhere at
    its next renewal, and the pool's janitor closes warm clients whose
    thread is gone."""
    await sync_to_async(queued.delete_thread_sync)(resource_id, thread_id)  # before the streams wake
    await streams.stop_thread((resource_id, thread_id))
    await sync_to_async(leases.forget_sync)(resource_id, thread_id)


def sessions_pruned(sender, cutoff, **kwargs) -> int:
    """``prune_sessions``: delete lease rows that lapsed before ``cutoff``, and
    lapsed ones (past the stream linger) of threads that have no mapping."""
    now = timezone.now()
    linger = timedelta(seconds=max(float(settings.OMNI_STREAM_LINGER_SECONDS), 60))
    mapped = mapping_of(OuterRef("resource_id"), OuterRef("thread_id"))
    old = ThreadLease.objects.filter(expires_at__lt=cutoff).delete()[0]
    orphaned = ThreadLease.objects.filter(expires_at__lt=now - linger).exclude(Exists(mapped)).delete()[0]
    return old + orphaned


def tool_call_decided(sender, decision: str, **kwargs) -> None:
    """A tool call was decided (by a person, Stop or the timeout): counted."""
    metrics.approval_decided(decision)
