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
import html
import logging
import re
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from ..errors import BadRequest, NotFound, Unavailable
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
        content = File(f, name=target)
        content.content_type = inspected.media_type  # the object's Content-Type on S3
        try:
            return attachment_id, storage().save(target, content)
        except Exception as exc:  # a full disk, an unreachable or refusing bucket
            log.warning("could not store attachment %s", attachment_id, exc_info=True)
            delete_files([target])  # a partial file, if any (a multipart upload is aborted by boto3)
            raise Unavailable("the attachment storage cannot take the file now; try again later") from exc


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


def open_sync(attachment: Attachment):
    """The stored file, open for reading (streamed from S3): 503 if the
    storage cannot be reached, 404 if the file is gone."""
    try:
        return storage().open(attachment.storage_name, "rb")
    except FileNotFoundError:
        log.error("attachment %s: its file %s is missing", attachment.attachment_id, attachment.storage_name)
        raise NotFound(f"no attachment {attachment.attachment_id!r}") from None
    except Exception as exc:
        log.warning("attachment storage unavailable", exc_info=True)
        raise Unavailable("the attachment storage cannot be reached; try again later") from exc


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


# A text block right before each attachment's block names it: the model
# reads the file's name, and the transcript names the upload even where the
# CLI re-encoded the block's bytes (it turns an image of more than a few
# hundred KB into a smaller JPEG, so its sha256 is no longer the upload's).
MARKER = re.compile(r'^<attachment id="(att-[0-9a-f]{32})" name="[^"]*"/>$')


def marker_block(attachment: Attachment) -> dict:
    name = html.escape(attachment.name, quote=True)
    return {"type": "text", "text": f'<attachment id="{attachment.attachment_id}" name="{name}"/>'}


def marked_id(block) -> str | None:
    """The attachment a marker block names (:func:`marker_block`), or None."""
    if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
        if found := MARKER.match(block["text"].strip()):
            return found[1]
    return None


def message_content_sync(attachments: list[Attachment], text: str) -> list[dict]:
    """A message's content blocks: each attachment's, after its marker,
    then the text (left out when blank: the API refuses an empty text block)."""
    blocks = []
    for attachment, block in zip(attachments, content_blocks_sync(attachments)):
        blocks += [marker_block(attachment), block]
    return blocks + ([{"type": "text", "text": text}] if text.strip() else [])


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
    # Locked first (PostgreSQL; SQLite writes one at a time): two threads
    # sharing an attachment, deleted at once, each still seeing the other's
    # use, would both keep it. The second waits here, then sees no use.
    list(Attachment.objects.select_for_update().filter(pk__in=pks).order_by("pk").values_list("pk"))
    AttachmentUse.objects.filter(resource_id=resource_id, thread_id=thread_id).delete()
    unused = Attachment.objects.filter(pk__in=pks).exclude(uses__isnull=False)
    names = list(unused.values_list("storage_name", flat=True))
    unused.delete()
    return names


def release_unmapped_sync(cutoff) -> tuple[int, int]:
    """Release the uses of threads that no longer exist, recorded before
    ``cutoff``: a turn that ran on as its thread was deleted may record its
    message's attachments after the delete released the thread's. Returns
    (threads, attachments deleted). ``prune_sessions`` runs it."""
    from django.db.models import Exists, OuterRef

    from ..models import SessionMapping

    def mapped(resource_id, thread_id):
        return SessionMapping.objects.filter(resource_id=resource_id, thread_id=thread_id)

    unmapped = (AttachmentUse.objects.filter(created_at__lt=cutoff)
                .exclude(Exists(mapped(OuterRef("resource_id"), OuterRef("thread_id"))))
                .values_list("resource_id", "thread_id").distinct())
    threads = deleted = 0
    for resource_id, thread_id in list(unmapped):
        with transaction.atomic():
            if mapped(resource_id, thread_id).exists():  # made again meanwhile
                continue
            names = release_thread_sync(resource_id, thread_id)
        threads += 1
        deleted += len(names)
        delete_files(names)
    return threads, deleted


def delete_files(names: list[str]) -> int:
    """Delete stored files (a missing one is fine); returns how many went."""
    gone = 0
    store = storage()
    if hasattr(store, "delete_many") and names:
        return store.delete_many(names)
    for name in names:
        try:
            store.delete(name)
            gone += 1
        except Exception:  # the next prune finds no row for it; log and go on
            log.warning("could not delete attachment file %s", name, exc_info=True)
    return gone


def orphans(cutoff):
    """Uploads never sent in a message, made before ``cutoff``."""
    return Attachment.objects.filter(sent_at__isnull=True, created_at__lt=cutoff)


def prune_orphans_sync(hours: float | None = None, now=None) -> int:
    """Delete uploads never sent in a message, older than ``hours``
    (``OMNI_ATTACHMENT_ORPHAN_HOURS``). Returns how many."""
    hours = settings.OMNI_ATTACHMENT_ORPHAN_HOURS if hours is None else hours
    cutoff = (now or timezone.now()) - timedelta(hours=hours)
    count, last_pk = 0, 0
    while True:
        with transaction.atomic():
            # locked (PostgreSQL): a message cannot take one of these meanwhile
            batch = list(orphans(cutoff).select_for_update().filter(pk__gt=last_pk)
                         .order_by("pk").values_list("pk", "storage_name")[:500])
            if not batch:
                break
            Attachment.objects.filter(pk__in=[pk for pk, _ in batch], sent_at__isnull=True).delete()
        last_pk = batch[-1][0]
        count += len(batch)
        delete_files([name for _, name in batch])
    if count:
        log.info("[ATTACHMENTS] Deleted %d upload(s) never sent in a message", count)
    return count


def uploads_named_sync(resource_id: str, refs: list[dict]):
    """The resource's uploads that a transcript's blocks name (each ref
    ``{"attachmentId" (from its marker, or None), "sha256", ...}``): by the
    id of its marker, else by the sha256 of its bytes, in one query for all.
    Returns ``find(ref)``: the upload, or None for one deleted since."""
    by_id: dict[str, Attachment] = {}
    by_sha: dict[str, Attachment] = {}
    if refs:
        ids = {ref["attachmentId"] for ref in refs if ref.get("attachmentId")}
        shas = {ref["sha256"] for ref in refs}
        for a in Attachment.objects.filter(Q(attachment_id__in=ids) | Q(sha256__in=shas),
                                           resource_id=resource_id).order_by("id"):
            by_id[a.attachment_id] = a
            by_sha.setdefault(a.sha256, a)
    return lambda ref: by_id.get(ref.get("attachmentId")) or by_sha.get(ref["sha256"])


def name_messages_sync(resource_id: str, messages: list[dict]) -> None:
    """A listing's messages (:func:`sessions_app.transcripts.session_messages`)
    name their attachments as the contract does: each ref (see
    :func:`uploads_named_sync`) becomes ``{"attachmentId", "name",
    "mediaType", "size"}`` of its upload; an upload deleted since keeps its
    block's facts and no id."""
    refs = [ref for m in messages for ref in m.get("attachments") or ()]
    if not refs:
        return
    find = uploads_named_sync(resource_id, refs)
    for m in messages:
        if m.get("attachments"):
            m["attachments"] = [_named(ref, find(ref)) for ref in m["attachments"]]


def _named(ref: dict, attachment: Attachment | None) -> dict:
    if attachment is None:
        return {"attachmentId": None, "name": ref["name"], "mediaType": ref["mediaType"],
                "size": ref["size"]}
    return {"attachmentId": attachment.attachment_id, "name": attachment.name,
            "mediaType": attachment.media_type, "size": attachment.size}
