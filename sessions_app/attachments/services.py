"""Attachments (contract §11): the one module that writes and deletes them.

The upload view, the turn pipeline, thread deletion, the prune command and
the sweep all call these. Synchronous functions (``*_sync``) run on a
worker thread; the bytes go through Django's storage API
(``storages["attachments"]``: local files or S3, see ``omni/settings.py``).

Rows and files: a file is written before its row and deleted after its
row's delete commits, so a row always names a file; a failure in between
leaves at most a file without a row (never a row without a file).
"""

from __future__ import annotations

import base64
import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from django.utils import timezone

from ..errors import BadRequest, NotFound
from ..models import Attachment, AttachmentUse
from .inspect import Inspected

log = logging.getLogger("omni.attachments")
READ_CHUNK = 256 * 1024


def storage():
    return storages["attachments"]


def new_id() -> str:
    return f"att-{uuid.uuid4().hex}"


def save_file_sync(inspected: Inspected) -> tuple[str, str]:
    """An inspected upload's file into the storage (file or network work:
    a worker thread of its own). Returns ``(attachment_id, storage name)``
    for :func:`create_row_sync`."""
    attachment_id = new_id()
    target = f"{attachment_id[4:6]}/{attachment_id}"
    with open(inspected.path, "rb") as f:
        return attachment_id, storage().save(target, File(f, name=target))


def create_row_sync(resource_id: str, saved: tuple[str, str], inspected: Inspected,
                    name: str) -> Attachment:
    """The row of a file :func:`save_file_sync` saved (database work: the
    database's thread); the file is deleted if the row cannot be written."""
    attachment_id, stored = saved
    try:
        with transaction.atomic():
            return Attachment.objects.create(
                attachment_id=attachment_id, resource_id=resource_id, name=name,
                media_type=inspected.media_type, size=inspected.size, sha256=inspected.sha256,
                width=inspected.width, height=inspected.height, pages=inspected.pages,
                storage_name=stored)
    except BaseException:
        delete_files([stored])
        raise


def store_sync(resource_id: str, inspected: Inspected, name: str) -> Attachment:
    """Keep an inspected upload: its file in the storage, then its row."""
    return create_row_sync(resource_id, save_file_sync(inspected), inspected, name)


def owned_sync(resource_id: str, attachment_id: str) -> Attachment:
    """The resource's attachment, or 404 (another resource's is as unknown)."""
    found = Attachment.objects.filter(resource_id=resource_id, attachment_id=attachment_id).first()
    if found is None:
        raise NotFound(f"no attachment {attachment_id!r}")
    return found


def resolve_sync(resource_id: str, attachment_ids: list[str]) -> list[Attachment]:
    """A message's attachments, in the order given (a repeated id once):
    each must be the resource's own upload (404 otherwise)."""
    ids = list(dict.fromkeys(attachment_ids))
    if len(ids) > settings.OMNI_ATTACHMENTS_PER_MESSAGE:
        raise BadRequest(f"at most {settings.OMNI_ATTACHMENTS_PER_MESSAGE} attachments in a message")
    found = {a.attachment_id: a for a in Attachment.objects.filter(resource_id=resource_id,
                                                                   attachment_id__in=ids)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"no attachment {missing[0]!r}")
    return [found[i] for i in ids]


def read_bytes(attachment: Attachment) -> bytes:
    with storage().open(attachment.storage_name, "rb") as f:
        return f.read()


def iter_bytes(attachment: Attachment, chunk: int = READ_CHUNK):
    """The stored bytes in chunks (a download: never whole in memory)."""
    with storage().open(attachment.storage_name, "rb") as f:
        while data := f.read(chunk):
            yield data


def content_block(attachment: Attachment, data: bytes) -> dict:
    """The Messages API content block that carries an attachment: an image
    block, a PDF document block, or a text document block (Markdown and
    CSV go as ``text/plain``, the one text type documents take), titled
    with the file's name."""
    if attachment.is_image:
        return {"type": "image", "source": {"type": "base64", "media_type": attachment.media_type,
                                            "data": base64.b64encode(data).decode("ascii")}}
    if attachment.media_type == "application/pdf":
        return {"type": "document", "title": attachment.name,
                "source": {"type": "base64", "media_type": "application/pdf",
                           "data": base64.b64encode(data).decode("ascii")}}
    return {"type": "document", "title": attachment.name,
            "source": {"type": "text", "media_type": "text/plain", "data": data.decode("utf-8")}}


def content_blocks_sync(attachments: list[Attachment]) -> list[dict]:
    return [content_block(a, read_bytes(a)) for a in attachments]


def record_use_sync(resource_id: str, thread_id: str, attachment_pks: list[int]) -> None:
    """The thread's messages carry these attachments (sent: never pruned as orphans)."""
    if not attachment_pks:
        return
    now = timezone.now()
    with transaction.atomic():
        Attachment.objects.filter(pk__in=attachment_pks, sent_at__isnull=True).update(sent_at=now)
        AttachmentUse.objects.bulk_create(
            [AttachmentUse(attachment_id=pk, resource_id=resource_id, thread_id=thread_id)
             for pk in attachment_pks], ignore_conflicts=True)


def copy_uses_sync(resource_id: str, from_thread: str, to_thread: str) -> None:
    """A fork carries its parent's attachments (its transcript holds them)."""
    pks = list(AttachmentUse.objects.filter(resource_id=resource_id, thread_id=from_thread)
               .values_list("attachment_id", flat=True))
    if pks:
        try:
            record_use_sync(resource_id, to_thread, pks)
        except IntegrityError:  # an attachment deleted meanwhile
            log.warning("attachments of %s changed while forking to %s", from_thread, to_thread)


def release_thread_sync(resource_id: str, thread_id: str) -> list[str]:
    """Inside the thread's delete transaction: its uses go, and so do the
    attachments no other thread uses. Returns their storage names: delete
    them (:func:`delete_files`) once the transaction committed."""
    pks = list(AttachmentUse.objects.filter(resource_id=resource_id, thread_id=thread_id)
               .values_list("attachment_id", flat=True))
    if not pks:
        return []
    AttachmentUse.objects.filter(resource_id=resource_id, thread_id=thread_id).delete()
    unused = Attachment.objects.filter(pk__in=pks).exclude(uses__isnull=False)
    names = list(unused.values_list("storage_name", flat=True))
    unused.delete()
    return names


def delete_files(names: list[str]) -> int:
    """Delete stored files (a missing one is fine); returns how many went."""
    gone = 0
    store = storage()
    for name in names:
        try:
            store.delete(name)
            gone += 1
        except Exception:  # the next prune finds no row for it; log and go on
            log.warning("could not delete attachment file %s", name, exc_info=True)
    return gone


def prune_orphans_sync(hours: float | None = None, now=None) -> int:
    """Delete uploads never sent in a message, older than ``hours``
    (``OMNI_ATTACHMENT_ORPHAN_HOURS``). Returns how many."""
    hours = settings.OMNI_ATTACHMENT_ORPHAN_HOURS if hours is None else hours
    cutoff = (now or timezone.now()) - timedelta(hours=hours)
    count, last_pk = 0, 0
    while True:
        with transaction.atomic():
            # locked (PostgreSQL): a message cannot take one of these meanwhile
            batch = list(Attachment.objects.select_for_update()
                         .filter(sent_at__isnull=True, created_at__lt=cutoff, pk__gt=last_pk)
                         .order_by("pk").values_list("pk", "storage_name")[:500])
            if not batch:
                break
            Attachment.objects.filter(pk__in=[pk for pk, _ in batch]).delete()
        last_pk = batch[-1][0]
        count += len(batch)
        delete_files([name for _, name in batch])
    if count:
        log.info("[ATTACHMENTS] Deleted %d upload(s) never sent in a message", count)
    return count


def by_sha_sync(resource_id: str, shas: set[str]) -> dict[str, Attachment]:
    """The resource's attachments by the sha256 of their stored bytes (how a
    transcript's content blocks name them)."""
    if not shas:
        return {}
    found: dict[str, Attachment] = {}
    for a in Attachment.objects.filter(resource_id=resource_id, sha256__in=shas).order_by("id"):
        found.setdefault(a.sha256, a)
    return found
