"""Deleting a thread erases its transcript everywhere it is kept: the mapping,
the transcript rows in the database (main and subagent) and the CLI's local
files under ``CLAUDE_CONFIG_DIR``. Through REST, the admin's single delete and
its bulk ``delete_selected``. A failure part-way leaves no mapping pointing at
an erased transcript and is reported as the contract's error JSON, never a 500.
"""

import json
import uuid
from pathlib import Path
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from django.db import DatabaseError, IntegrityError, OperationalError
from django.urls import reverse

from sessions_app import services, transcripts
from sessions_app.models import SessionMapping, TranscriptEntry, TranscriptSummary
from sessions_app.transcripts import DjangoSessionStore
from tests.helpers import error_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("config_dir")]

JSON = "application/json"
PROJECT = "-srv-omni-workspace"
SUBAGENT = "subagents/agent-1"


class Stored:
    """A thread with everything a real turn leaves behind."""

    def __init__(self, config_dir: Path, thread_id: str, resource_id: str = "alice",
                 session_id: str | None = None, project_key: str = PROJECT):
        self.thread_id, self.resource_id = thread_id, resource_id
        self.session_id = session_id or str(uuid.uuid4())
        self.project_key = project_key
        self.mapping = async_to_sync(services.save_session)(
            thread_id, resource_id, self.session_id, user_message=f"hello from {thread_id}")
        store = DjangoSessionStore()
        main = {"project_key": project_key, "session_id": self.session_id}
        sub = {**main, "subpath": SUBAGENT}
        user_uuid, reply_uuid, sub_uuid = (str(uuid.uuid4()) for _ in range(3))
        async_to_sync(store.append)(main, [
            {"type": "user", "uuid": user_uuid, "sessionId": self.session_id,
             "message": {"role": "user", "content": f"hello from {thread_id}"}},
            {"type": "assistant", "uuid": reply_uuid, "parentUuid": user_uuid,
             "sessionId": self.session_id,
             "message": {"id": f"msg_{thread_id}", "role": "assistant",
                         "content": [{"type": "text", "text": "hi"}]}},
        ])
        async_to_sync(store.append)(sub, [
            {"type": "user", "uuid": sub_uuid, "isSidechain": True, "sessionId": self.session_id,
             "message": {"role": "user", "content": "subagent task"}},
        ])
        project = config_dir / "projects" / project_key
        self.main_file = project / f"{self.session_id}.jsonl"
        self.sub_dir = project / self.session_id
        self.sub_file = self.sub_dir / "subagents" / "agent-1.jsonl"
        self.sub_file.parent.mkdir(parents=True)
        self.main_file.write_text(json.dumps({"type": "user", "uuid": user_uuid}) + "\n")
        self.sub_file.write_text(json.dumps({"type": "user", "uuid": sub_uuid}) + "\n")
        assert self.rows() == (3, 1)
        assert self.has_files()

    def rows(self) -> tuple[int, int]:
        """(transcript lines, summary rows) stored for the session."""
        return (TranscriptEntry.objects.filter(session_id=self.session_id).count(),
                TranscriptSummary.objects.filter(session_id=self.session_id).count())

    def subagent_rows(self) -> int:
        return TranscriptEntry.objects.filter(session_id=self.session_id, subpath=SUBAGENT).count()

    def has_mapping(self) -> bool:
        return SessionMapping.objects.filter(
            thread_id=self.thread_id, resource_id=self.resource_id).exists()

    def has_files(self) -> bool:
        return self.main_file.exists() and self.sub_file.exists()

    def assert_erased(self):
        assert not self.has_mapping()
        assert self.rows() == (0, 0), "transcript lines (main and subagent) and summary erased"
        assert not self.main_file.exists(), "the local transcript is removed"
        assert not self.sub_dir.exists(), "the local subagent folder is removed"

    def assert_intact(self):
        assert self.has_mapping()
        assert self.rows() == (3, 1) and self.subagent_rows() == 1
        assert self.has_files()

    def ref(self) -> dict:
        return {"threadId": self.thread_id, "resourceId": self.resource_id}


def rest_delete(client, payload):
    return client.delete("/api/sessions", data=json.dumps(payload), content_type=JSON)


# --- the three ways to delete ----------------------------------------------------


def test_rest_delete_erases_mapping_rows_and_local_files(client, config_dir):
    gone = Stored(config_dir, "t-gone")
    other = Stored(config_dir, "t-other")
    response = rest_delete(client, gone.ref())
    assert response.status_code == 200, response.content
    assert json.loads(response.content) == {"success": True, **gone.ref()}
    gone.assert_erased()
    other.assert_intact()
    # the project folder the CLI shares between sessions stays
    assert other.main_file.parent.is_dir()


def test_rest_delete_erases_under_every_project_key(client, config_dir):
    """A session adopted by another working directory has rows and files
    under more than one project key: all of them go."""
    thread = Stored(config_dir, "t-moved")
    store = DjangoSessionStore()
    async_to_sync(store.append)({"project_key": "-other-machine", "session_id": thread.session_id},
                                [{"type": "user", "uuid": str(uuid.uuid4()),
                                  "message": {"role": "user", "content": "moved"}}])
    elsewhere = config_dir / "projects" / "-other-machine" / f"{thread.session_id}.jsonl"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("{}\n")
    assert rest_delete(client, thread.ref()).status_code == 200
    thread.assert_erased()
    assert not elsewhere.exists()


def test_admin_delete_erases(admin_client, config_dir):
    gone = Stored(config_dir, "t-admin")
    other = Stored(config_dir, "t-kept", resource_id="bob")
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[gone.mapping.pk])
    page = admin_client.get(url)
    assert page.status_code == 200  # the confirmation page
    gone.assert_intact()
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302, response.content[:500]
    gone.assert_erased()
    other.assert_intact()


def test_admin_bulk_delete_erases(admin_client, config_dir):
    first = Stored(config_dir, "t-bulk-1")
    second = Stored(config_dir, "t-bulk-2", resource_id="bob")
    kept = Stored(config_dir, "t-bulk-kept")
    response = admin_client.post(reverse("admin:sessions_app_sessionmapping_changelist"), {
        "action": "delete_selected",
        "_selected_action": [first.mapping.pk, second.mapping.pk],
        "post": "yes",
    })
    assert response.status_code == 302, response.content[:500]
    first.assert_erased()
    second.assert_erased()
    kept.assert_intact()


# --- a session shared by two mappings ---------------------------------------------


def test_a_transcript_another_mapping_uses_is_kept(client, config_dir):
    thread = Stored(config_dir, "t-one")
    # a second mapping onto the same session (as if made by hand)
    twin = async_to_sync(services.save_session)("t-twin", "alice", thread.session_id)
    response = rest_delete(client, thread.ref())
    assert response.status_code == 200, response.content
    assert not thread.has_mapping()
    assert SessionMapping.objects.filter(pk=twin.pk).exists()
    assert thread.rows() == (3, 1) and thread.subagent_rows() == 1
    assert thread.has_files()
    # the last mapping of the session takes the transcript with it
    assert rest_delete(client, {"threadId": "t-twin", "resourceId": "alice"}).status_code == 200
    thread.assert_erased()


def test_unknown_thread_is_404_and_erases_nothing(client, config_dir):
    thread = Stored(config_dir, "t-here")
    error = error_of(rest_delete(client, {"threadId": "t-here", "resourceId": "bob"}), 404)
    assert error["code"] == "not_found"
    thread.assert_intact()


# --- failures part-way ------------------------------------------------------------


def test_local_files_that_cannot_be_removed_are_a_503(client, config_dir):
    thread = Stored(config_dir, "t-stuck")
    with mock.patch.object(services, "erase_local_transcript",
                           side_effect=PermissionError(13, "Permission denied")):
        response = rest_delete(client, thread.ref())
    error = error_of(response, 503)
    assert error["code"] == "erase_failed"
    assert "t-stuck" in error["message"]
    # nothing points at the half-erased transcript, and its rows are gone
    assert not thread.has_mapping()
    assert thread.rows() == (0, 0)
    assert thread.has_files()  # what could not be removed is still there
    # the thread is gone: a retry says so
    assert error_of(rest_delete(client, thread.ref()), 404)["code"] == "not_found"


def test_a_failure_inside_the_real_file_removal_is_a_503(client, config_dir):
    """Not the service's own function patched: ``shutil.rmtree`` fails on
    the subagent folder after the main file was unlinked."""
    thread = Stored(config_dir, "t-rmtree")
    with mock.patch("sessions_app.services.shutil.rmtree",
                    side_effect=OSError(39, "Directory not empty")):
        response = rest_delete(client, thread.ref())
    assert error_of(response, 503)["code"] == "erase_failed"
    assert not thread.has_mapping() and thread.rows() == (0, 0)


@pytest.mark.parametrize("exc", [
    OperationalError("database is locked"),
    IntegrityError("FOREIGN KEY constraint failed"),
    DatabaseError("disk image is malformed"),
], ids=["operational", "integrity", "database"])
def test_a_database_failure_rolls_the_mapping_back(client, config_dir, exc):
    thread = Stored(config_dir, "t-rollback")
    other = Stored(config_dir, "t-bystander")
    with mock.patch.object(transcripts, "erase_session_rows", side_effect=exc):
        response = rest_delete(client, thread.ref())
    error = error_of(response, 503)  # an error JSON, never a 500
    assert str(exc) not in error["message"], "no driver details to clients"
    # the transaction rolled back: the mapping is still there, and so is all the rest
    thread.assert_intact()
    other.assert_intact()
    # once the database answers again the delete goes through
    assert rest_delete(client, thread.ref()).status_code == 200
    thread.assert_erased()


def test_the_service_removes_nothing_local_when_the_database_fails(config_dir):
    thread = Stored(config_dir, "t-svc")
    with (
        mock.patch.object(transcripts, "erase_session_rows",
                          side_effect=OperationalError("database is locked")),
        mock.patch.object(services, "erase_local_transcript") as erase_local,
        pytest.raises(OperationalError),
    ):
        async_to_sync(services.delete_session)(thread.thread_id, thread.resource_id)
    erase_local.assert_not_called()
    thread.assert_intact()


def test_admin_delete_with_stuck_local_files_reports_the_error(admin_client, config_dir):
    thread = Stored(config_dir, "t-admin-stuck")
    url = reverse("admin:sessions_app_sessionmapping_delete", args=[thread.mapping.pk])
    with mock.patch.object(services, "erase_local_transcript",
                           side_effect=PermissionError(13, "Permission denied")):
        response = admin_client.post(url, {"post": "yes"}, follow=True)
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("could not be removed" in m for m in messages), messages
    assert not thread.has_mapping() and thread.rows() == (0, 0)


def test_admin_bulk_delete_goes_on_after_a_failure(admin_client, config_dir):
    first = Stored(config_dir, "t-bulk-stuck")
    second = Stored(config_dir, "t-bulk-next")
    real = services.erase_local_transcript

    def stuck_for_first(session_id):
        if session_id == first.session_id:
            raise PermissionError(13, "Permission denied")
        return real(session_id)

    with mock.patch.object(services, "erase_local_transcript", side_effect=stuck_for_first):
        response = admin_client.post(reverse("admin:sessions_app_sessionmapping_changelist"), {
            "action": "delete_selected",
            "_selected_action": [first.mapping.pk, second.mapping.pk],
            "post": "yes",
        }, follow=True)
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("t-bulk-stuck" in m and "could not be removed" in m for m in messages), messages
    assert not first.has_mapping() and first.rows() == (0, 0)
    second.assert_erased()


# --- the local copy after a turn -------------------------------------------------


def test_a_mirrored_local_copy_is_dropped(config_dir):
    stored = Stored(config_dir, "mirrored")
    assert services.drop_mirrored_local_transcript(stored.session_id) is True
    assert not stored.has_files()
    assert stored.rows() == (3, 1)  # the database keeps the transcript


def test_a_local_copy_with_lines_not_yet_in_the_database_is_kept(config_dir):
    stored = Stored(config_dir, "unmirrored")
    with stored.main_file.open("a") as f:
        f.write(json.dumps({"type": "assistant", "uuid": str(uuid.uuid4())}) + "\n")
    assert services.drop_mirrored_local_transcript(stored.session_id) is False
    assert stored.main_file.exists() and stored.sub_file.exists()
