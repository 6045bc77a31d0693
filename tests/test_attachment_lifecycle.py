"""Attachments' lifecycle (contract §11): deleting a thread deletes the
attachments no other thread uses (a fork's stay), and an upload never sent
in a message is deleted after ``OMNI_ATTACHMENT_ORPHAN_HOURS``, by
``prune_sessions`` and by the server's periodic sweep."""

import asyncio
import hashlib
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.utils import timezone

from sessions_app import services
from sessions_app.attachments import services as attachments
from sessions_app.attachments import sweeper
from sessions_app.attachments.inspect import Inspected
from sessions_app.models import Attachment, AttachmentUse, SessionMapping

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("config_dir")]


def upload(tmp_path, resource="alice", text="hello") -> Attachment:
    """An upload as ``POST /api/attachments`` keeps it (a text file)."""
    data = f"{text} {uuid.uuid4().hex}\n".encode()
    path = tmp_path / f"{uuid.uuid4().hex}.txt"
    path.write_bytes(data)
    return attachments.store_sync(resource, Inspected(
        media_type="text/plain", path=str(path), size=len(data), sha256=hashlib.sha256(data).hexdigest()),
        f"{text}.txt")


def thread(thread_id, resource="alice") -> None:
    async_to_sync(services.save_session)(thread_id, resource, str(uuid.uuid4()), user_message="hi")


def exists(a: Attachment) -> tuple[bool, bool]:
    """(its row, its file)"""
    return Attachment.objects.filter(pk=a.pk).exists(), attachments.storage().exists(a.storage_name)


def test_deleting_a_thread_deletes_the_attachments_only_it_uses(tmp_path, attachments_dir):
    shared, own, other = upload(tmp_path, text="shared"), upload(tmp_path, text="own"), upload(tmp_path)
    thread("t-a")
    attachments.record_use_sync("alice", "t-a", [shared.pk])
    thread("t-b")  # t-a's fork: carries t-a's attachments, then one of its own
    attachments.copy_uses_sync("alice", "t-a", "t-b")
    attachments.record_use_sync("alice", "t-a", [own.pk])
    attachments.record_use_sync("alice", "t-b", [other.pk])
    assert (attachments_dir / own.storage_name).is_file()

    async_to_sync(services.delete_session)("t-a", "alice")
    assert exists(own) == (False, False)
    assert not (attachments_dir / own.storage_name).exists()
    assert exists(shared) == (True, True)
    assert exists(other) == (True, True)
    assert list(AttachmentUse.objects.values_list("thread_id", flat=True).order_by("thread_id")) == ["t-b", "t-b"]

    async_to_sync(services.delete_session)("t-b", "alice")
    assert exists(shared) == (False, False)
    assert exists(other) == (False, False)
    assert not AttachmentUse.objects.exists()


def test_another_resources_thread_of_the_same_id_keeps_its_attachments(tmp_path):
    mine, theirs = upload(tmp_path), upload(tmp_path, resource="bob")
    thread("t-1")
    thread("t-1", resource="bob")
    attachments.record_use_sync("alice", "t-1", [mine.pk])
    attachments.record_use_sync("bob", "t-1", [theirs.pk])
    async_to_sync(services.delete_session)("t-1", "alice")
    assert exists(mine) == (False, False)
    assert exists(theirs) == (True, True)


def test_a_failed_thread_delete_keeps_rows_and_files(tmp_path, monkeypatch):
    """The files go only once the delete commits: rolled back, nothing is lost."""
    a = upload(tmp_path)
    thread("t-a")
    attachments.record_use_sync("alice", "t-a", [a.pk])

    def fail(session_id):
        raise RuntimeError("the transcript's delete failed")

    monkeypatch.setattr("sessions_app.transcripts.erase_session_rows", fail)
    with pytest.raises(RuntimeError):
        async_to_sync(services.delete_session)("t-a", "alice")
    assert SessionMapping.objects.filter(thread_id="t-a").exists()
    assert exists(a) == (True, True)
    assert AttachmentUse.objects.filter(thread_id="t-a").exists()


def test_the_admins_delete_deletes_the_threads_attachments(tmp_path, admin_client):
    """The admin's delete runs inside its own transaction: the files go when it commits."""
    a = upload(tmp_path)
    thread("t-a")
    attachments.record_use_sync("alice", "t-a", [a.pk])
    pk = SessionMapping.objects.get(thread_id="t-a").pk
    response = admin_client.post(f"/admin/sessions_app/sessionmapping/{pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not SessionMapping.objects.filter(thread_id="t-a").exists()
    assert exists(a) == (False, False)


def age(a: Attachment, hours: float) -> None:
    Attachment.objects.filter(pk=a.pk).update(created_at=timezone.now() - timedelta(hours=hours))


def test_prune_sessions_deletes_uploads_never_sent(tmp_path, settings):
    settings.OMNI_ATTACHMENT_ORPHAN_HOURS = 24
    old, young, sent = upload(tmp_path), upload(tmp_path), upload(tmp_path)
    thread("t-a")
    attachments.record_use_sync("alice", "t-a", [sent.pk])
    for a, hours in ((old, 25), (young, 23), (sent, 48)):
        age(a, hours)

    out = StringIO()
    call_command("prune_sessions", "--older-than", "30d", "--dry-run", stdout=out)
    assert "Would delete 1 uploads never sent in a message" in out.getvalue()
    assert exists(old) == (True, True)

    out = StringIO()
    call_command("prune_sessions", "--older-than", "30d", stdout=out)
    assert "Deleted 1 uploads never sent in a message" in out.getvalue()
    assert exists(old) == (False, False)
    assert exists(young) == (True, True)
    assert exists(sent) == (True, True)  # sent long ago: it goes with its threads

    out = StringIO()
    call_command("prune_sessions", "--older-than", "30d", "--uploads-older-than", "12h", stdout=out)
    assert "Deleted 1 uploads never sent in a message" in out.getvalue()
    assert exists(young) == (False, False)


def test_prune_sessions_deletes_an_old_threads_attachments(tmp_path):
    a = upload(tmp_path)
    thread("t-old")
    attachments.record_use_sync("alice", "t-old", [a.pk])
    SessionMapping.objects.filter(thread_id="t-old").update(updated_at=timezone.now() - timedelta(days=40))
    call_command("prune_sessions", "--older-than", "30d", stdout=StringIO())
    assert exists(a) == (False, False)


def test_prune_sessions_releases_uses_recorded_after_the_threads_delete(tmp_path):
    """A turn that ran on as its thread was deleted records its message's
    attachments after the delete: prune_sessions lets them go a day later."""
    late, kept = upload(tmp_path), upload(tmp_path)
    thread("t-gone")
    thread("t-live")
    async_to_sync(services.delete_session)("t-gone", "alice")
    attachments.record_use_sync("alice", "t-gone", [late.pk, kept.pk])  # the turn's, after the delete
    attachments.record_use_sync("alice", "t-live", [kept.pk])
    call_command("prune_sessions", "--older-than", "30d", stdout=StringIO())
    assert exists(late) == (True, True)  # recorded just now: a fork in the making looks the same
    AttachmentUse.objects.update(created_at=timezone.now() - timedelta(hours=25))
    out = StringIO()
    call_command("prune_sessions", "--older-than", "30d", stdout=out)
    assert "Deleted 1 attachments of 1 threads deleted while a turn ran on them." in out.getvalue()
    assert exists(late) == (False, False)
    assert exists(kept) == (True, True)
    assert list(AttachmentUse.objects.values_list("thread_id", flat=True)) == ["t-live"]


def test_the_servers_sweep_deletes_orphaned_uploads(tmp_path, settings):
    """The sweep runs on the server's loop (``chat_app.lifecycle`` starts it:
    tests/test_attachment_s3.py sees it in a live server), first after a
    random part of its interval, then every interval."""
    settings.OMNI_ATTACHMENT_ORPHAN_HOURS = 1
    settings.OMNI_ATTACHMENT_SWEEP_SECONDS = 0.2
    old, young = upload(tmp_path), upload(tmp_path)
    age(old, 2)

    async def gone(a) -> bool:
        for _ in range(100):
            await asyncio.sleep(0.1)
            if not await Attachment.objects.filter(pk=a.pk).aexists():
                return True
        return False

    async def run():
        sweeper.start()
        try:
            assert await gone(old)
            assert await Attachment.objects.filter(pk=young.pk).aexists()
            await Attachment.objects.filter(pk=young.pk).aupdate(
                created_at=timezone.now() - timedelta(hours=2))  # aged now: a later sweep takes it
            assert await gone(young)
        finally:
            await sweeper.stop()

    async_to_sync(run)()
    assert exists(old) == (False, False)
    assert exists(young) == (False, False)
    assert sweeper._sweeper.task is None


def test_two_sweeps_at_once_delete_each_upload_once(tmp_path, settings):
    """Several workers sweep the same database: no error, every orphan gone once."""
    settings.OMNI_ATTACHMENT_ORPHAN_HOURS = 1
    uploads = [upload(tmp_path) for _ in range(6)]
    for a in uploads:
        age(a, 2)

    async def both():
        from asgiref.sync import sync_to_async

        def prune():
            from django.db import connections

            try:
                return attachments.prune_orphans_sync()
            finally:
                connections.close_all()

        one = sync_to_async(prune, thread_sensitive=False)
        return await asyncio.gather(one(), one())

    counts = async_to_sync(both)()
    assert sum(counts) == 6
    assert not Attachment.objects.exists()
