"""Delete sessions idle for longer than a given age, like ``clearsessions``
does for Django's own sessions: run it from cron.

    python manage.py prune_sessions --older-than 30d [--dry-run]

A thread whose ``updated_at`` is older than the cutoff is deleted through the
session service (mapping, transcript rows, the CLI's local files). Transcripts
in the database that no mapping points at and that were last written before
the cutoff (left by a crash, or mirrored by another tool) are erased too.
A deleted thread's attachments go with it unless another thread uses them
(and those a turn recorded on a thread deleted as it ran, once older than
the uploads' cutoff below).

Uploads never sent in a message (contract §11) older than
``--uploads-older-than`` (default ``OMNI_ATTACHMENT_ORPHAN_HOURS``, 24h) are
deleted too, as the server's own sweep does every
``OMNI_ATTACHMENT_SWEEP_SECONDS``.
"""

import re
from datetime import timedelta

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from django.conf import settings

from sessions_app import services, transcripts
from sessions_app.attachments import services as attachments
from sessions_app.errors import NotFound
from sessions_app.models import SessionMapping, TranscriptSummary
from sessions_app.signals import sessions_pruned

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise CommandError(f"--older-than {text!r}: use a number and a unit, e.g. 30d, 12h, 2w")
    return timedelta(**{UNITS[match[2]]: int(match[1])})


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CommandError(f"--batch-size {text!r}: use a whole number of at least 1")
    return value


class Command(BaseCommand):
    help = "Delete threads (and their transcripts) not updated for longer than --older-than."

    def add_arguments(self, parser):
        parser.add_argument("--older-than", required=True, type=parse_age, help="e.g. 30d, 12h, 2w")
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument("--batch-size", type=positive_int, default=500)
        parser.add_argument(
            "--uploads-older-than", type=parse_age, default=None, metavar="AGE",
            help="delete attachments uploaded longer ago than this and never sent in a message "
                 "(default: OMNI_ATTACHMENT_ORPHAN_HOURS, %sh)" % f"{settings.OMNI_ATTACHMENT_ORPHAN_HOURS:g}")

    def handle(self, *args, older_than, dry_run, batch_size, uploads_older_than, **options):
        now = timezone.now()
        cutoff = now - older_than
        uploads_age = (uploads_older_than if uploads_older_than is not None
                       else timedelta(hours=settings.OMNI_ATTACHMENT_ORPHAN_HOURS))
        uploads_cutoff = now - uploads_age
        old = SessionMapping.objects.filter(updated_at__lt=cutoff).order_by("pk")
        cutoff_ms = int(cutoff.timestamp() * 1000)
        # A session counts as written at its latest write under any project key.
        orphans = (
            TranscriptSummary.objects.filter(mtime_ms__lt=cutoff_ms)
            .exclude(session_id__in=SessionMapping.objects.values("session_id"))
            .exclude(session_id__in=TranscriptSummary.objects.filter(
                mtime_ms__gte=cutoff_ms).values("session_id"))
            .values_list("session_id", flat=True)
            .distinct()
        )
        if dry_run:
            self.stdout.write(
                f"Would delete {old.count()} threads and {len(set(orphans))} orphaned transcripts "
                f"not updated since {cutoff:%Y-%m-%d %H:%M:%S}Z."
            )
            self.stdout.write(
                f"Would delete {attachments.orphans(uploads_cutoff).count()} uploads never sent in a message, "
                f"uploaded before {uploads_cutoff:%Y-%m-%d %H:%M:%S}Z."
            )
            return
        threads = 0
        last_pk = 0
        failed: list[str] = []  # local files left behind; the rest goes on
        while batch := list(old.filter(pk__gt=last_pk).values_list("pk", "thread_id", "resource_id")[:batch_size]):
            for pk, thread_id, resource_id in batch:
                try:
                    async_to_sync(services.delete_session)(thread_id, resource_id)
                    threads += 1
                except NotFound:
                    pass  # deleted meanwhile
                except services.EraseFailed as exc:
                    threads += 1  # the mapping and rows are gone, not the files
                    failed.append(exc.message)
                last_pk = pk
        erased = 0
        for session_id in set(orphans):
            transcripts.erase_session_rows(session_id)  # one transaction per session
            erased += 1
            try:
                services.erase_local_transcript(session_id)
            except OSError as exc:
                failed.append(f"the local transcript of {session_id} could not be removed: {exc}")
        # what other apps keep per thread (the chat app's lapsed thread leases)
        others = sum(n for _, n in sessions_pruned.send(sender=SessionMapping, cutoff=cutoff)
                     if isinstance(n, int))
        self.stdout.write(
            f"Deleted {threads} threads and {erased} orphaned transcripts "
            f"not updated since {cutoff:%Y-%m-%d %H:%M:%S}Z"
            + (f" (and {others} other rows kept per thread)." if others else ".")
        )
        uploads = attachments.prune_orphans_sync(now=uploads_cutoff, hours=0)
        self.stdout.write(
            f"Deleted {uploads} uploads never sent in a message, "
            f"uploaded before {uploads_cutoff:%Y-%m-%d %H:%M:%S}Z."
        )
        # uses a turn recorded after its thread's delete (it ran on as the thread went)
        gone_threads, released = attachments.release_unmapped_sync(uploads_cutoff)
        if gone_threads:
            self.stdout.write(f"Deleted {released} attachments of {gone_threads} threads deleted while a "
                              "turn ran on them.")
        if failed:
            for message in failed:
                self.stderr.write(message)
            raise CommandError(f"{len(failed)} local transcript(s) could not be removed")
