"""``manage.py backup PATH``: a consistent copy of the embedded libSQL file,
made while a server runs turns, restores into a fresh data dir where a
thread resumes from the copy (the transcript is in the database; the CLI's
config dir is a cache). PostgreSQL and libSQL servers are refused with a
pointer to their own tools."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.utils import ConnectionHandler

from omni.db.urls import database_from_url
from sessions_app import services
from sessions_app.management.commands.backup import source_file
from tests.e2e import ROOT, Server, new_id, python_bin, reply, store_enabled

EMBEDDED = connection.vendor == "sqlite" and not getattr(connection, "is_remote", False)
# The copy is of the embedded file; on PostgreSQL (make test's second run)
# the command refuses instead (tested below): not a missing service.
embedded_only = pytest.mark.skipif(not EMBEDDED, reason="backs up the embedded libSQL file only")


def backup(*args) -> str:
    out = io.StringIO()
    call_command("backup", *map(str, args), stdout=out)
    return out.getvalue()


def rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# --- the command ------------------------------------------------------------------------

@embedded_only
@pytest.mark.django_db(transaction=True)
def test_a_backup_is_a_whole_checked_private_file_and_never_overwrites_without_force(tmp_path):
    async_to_sync(services.save_session)("bk-1", "ava", "sess-bk-1", user_message="keep me")
    target = tmp_path / "copy.db"
    out = backup(target)
    assert f"to {target}:" in out and "1 threads" in out
    assert rows(target, "PRAGMA journal_mode") == [("delete",)]  # one file, no -wal beside it
    assert rows(target, "PRAGMA quick_check") == [("ok",)]
    assert rows(target, "SELECT thread_id, resource_id, session_id FROM sessions_app_sessionmapping") == [
        ("bk-1", "ava", "sess-bk-1")]
    assert (target.stat().st_mode & 0o777) == 0o600  # it holds every conversation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db"]  # no temporary file left

    async_to_sync(services.save_session)("bk-2", "ava", "sess-bk-2", user_message="and me")
    with pytest.raises(CommandError, match="exists: use --force"):
        backup(target)
    assert len(rows(target, "SELECT * FROM sessions_app_sessionmapping")) == 1  # untouched
    assert "2 threads" in backup(target, "--force")
    assert len(rows(target, "SELECT * FROM sessions_app_sessionmapping")) == 2

    folder = tmp_path / "nightly"
    folder.mkdir()
    backup(folder)  # a directory: a timestamped file in it
    [made] = folder.iterdir()
    assert made.name.startswith("sessions-") and made.suffix == ".db"


def fingerprint(path: Path):
    """What replacing or writing ``path`` would change (None: no such file).
    Not the -shm's time: a reader may touch its shared memory."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, None if path.name.endswith("-shm") else st.st_mtime_ns


@embedded_only
@pytest.mark.django_db(transaction=True)
def test_no_file_of_the_live_database_is_ever_overwritten_even_with_force_or_through_a_link(tmp_path):
    async_to_sync(services.save_session)("bk-live", "ava", "sess-bk-live", user_message="keep me")
    database = source_file(connection)
    files = [Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
    assert files[1].exists()  # WAL mode: the log the server's commits sit in
    before = {path: fingerprint(path) for path in files}

    for number, path in enumerate(files):
        link = tmp_path / f"link-{number}.db"
        link.symlink_to(path)  # also to a -journal that does not exist (yet)
        for target, args in ((path, ["--force"]), (path, []), (link, ["--force"])):
            with pytest.raises(CommandError, match="is a file of the live database"):
                backup(target, *args)
        assert link.is_symlink() and link.readlink() == path  # the link too is left alone
    chained = tmp_path / "chained.db"
    chained.symlink_to(tmp_path / "link-1.db")  # a link to a link to the -wal
    with pytest.raises(CommandError, match="is a file of the live database"):
        backup(chained, "--force")
    try:
        os.link(files[1], tmp_path / "hard.db")
    except OSError:  # another filesystem: no hard link to test
        pass
    else:
        with pytest.raises(CommandError, match="is a file of the live database"):
            backup(tmp_path / "hard.db", "--force")

    assert {path: fingerprint(path) for path in files} == before  # none written, none created
    assert not any(p.name.endswith(".tmp") for p in database.parent.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"link-{n}.db" for n in range(4)] + ["chained.db"] + (["hard.db"] if (tmp_path / "hard.db").exists() else []))
    # the database still answers, and a backup elsewhere still works
    assert "1 threads" in backup(tmp_path / "copy.db")


@pytest.mark.skipif(EMBEDDED, reason="the refusal on PostgreSQL / a libSQL server, as configured")
@pytest.mark.django_db
def test_the_configured_server_database_is_refused_with_its_own_tool_named(tmp_path):
    with pytest.raises(CommandError, match="pg_dump|server's own tooling"):
        backup(tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()


@pytest.mark.engine_agnostic
@pytest.mark.parametrize("url, expected", [
    ("postgres://omni:s3cret@db.internal:5432/omni", "pg_dump"),
    ("libsql://omni.turso.io?authToken=s3cret", "libSQL server (libsql://omni.turso.io)"),
    ("wss://sqld.internal:8080", "server's own tooling"),
])
def test_server_databases_are_refused_with_a_pointer_and_no_secret(url, expected, tmp_path):
    handler = ConnectionHandler({"default": database_from_url(url, tmp_path)})
    with pytest.raises(CommandError) as refused:
        source_file(handler["default"])  # no connection is made
    assert expected in str(refused.value) and "s3cret" not in str(refused.value)


@pytest.mark.engine_agnostic
def test_a_missing_file_is_refused_not_created(tmp_path):
    handler = ConnectionHandler({"default": database_from_url(f"file:{tmp_path / 'none.db'}", tmp_path)})
    with pytest.raises(CommandError, match="No database at .*none.db .*migrate"):
        source_file(handler["default"])
    assert not (tmp_path / "none.db").exists()


# --- attachments ---------------------------------------------------------------------------

def keep(resource: str, data: bytes):
    """An upload as ``POST /api/attachments`` keeps it."""
    import hashlib
    import tempfile

    from sessions_app.attachments import services as attachments
    from sessions_app.attachments.inspect import Inspected

    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    return attachments.store_sync(resource, Inspected(
        media_type="text/plain", path=f.name, size=len(data), sha256=hashlib.sha256(data).hexdigest()), "a.txt")


@embedded_only
@pytest.mark.django_db(transaction=True)
def test_the_attachments_named_in_the_copy_are_copied_beside_it(tmp_path, attachments_dir, settings):
    from sessions_app.attachments import services as attachments

    async_to_sync(services.save_session)("bk-a", "ava", "sess-bk-a", user_message="see attached")
    sent, unsent, gone = keep("ava", b"sent\n"), keep("ava", b"not sent yet\n"), keep("ava", b"deleted\n")
    attachments.record_use_sync("ava", "bk-a", [sent.pk, gone.pk])
    (attachments_dir / gone.storage_name).unlink()  # as if its thread went after the snapshot
    (attachments_dir / "zz").mkdir()
    (attachments_dir / "zz" / "att-no-row").write_bytes(b"no row names me")

    target = tmp_path / "copy.db"
    out = backup(target)
    files = tmp_path / "copy.db.attachments"
    assert f"Copied 2 attachment files (18 bytes) from {attachments_dir} to {files}; 1 deleted meanwhile left out" in out
    assert (files / sent.storage_name).read_bytes() == b"sent\n"
    assert (files / unsent.storage_name).read_bytes() == b"not sent yet\n"
    assert sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()) == sorted(
        [sent.storage_name, unsent.storage_name])  # only what a row of the copy names
    assert ((files / sent.storage_name).stat().st_mode & 0o777) == 0o600
    assert rows(target, "SELECT attachment_id FROM sessions_app_attachment ORDER BY id") == [
        (sent.attachment_id,), (unsent.attachment_id,)]  # a row always names a file
    assert rows(target, "SELECT thread_id FROM sessions_app_attachmentuse") == [("bk-a",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "copy.db.attachments"]

    keep("ava", b"one more\n")
    with pytest.raises(CommandError, match="exists: use --force"):
        backup(target)
    assert "Copied 3 attachment files" in backup(target, "--force")
    assert len([p for p in files.rglob("*") if p.is_file()]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "copy.db.attachments"]

    with pytest.raises(CommandError, match="live attachments' directory"):
        backup(attachments_dir / "inside.db")  # its .attachments/ would be in the live one
    assert not (attachments_dir / "inside.db").exists()

    settings.STORAGES = {**settings.STORAGES, "attachments": {
        "BACKEND": "sessions_app.attachments.s3.S3AttachmentStorage",
        "OPTIONS": {"bucket_name": "omni-files", "location": "prod", "endpoint_url": None}}}
    out = backup(tmp_path / "s3.db")
    assert "Attachments are kept in S3 bucket s3://omni-files/prod: NOT in this backup" in out
    assert not (tmp_path / "s3.db.attachments").exists()
    from sessions_app.management.commands.backup import Command

    help_text = " ".join(Command().create_parser("manage.py", "backup").format_help().split())
    assert "to PATH.attachments/. Attachments in an S3 bucket are not backed up" in help_text


# --- back up a live server during turns, restore, resume ----------------------------------

def manage(server: Server, *args: str) -> subprocess.CompletedProcess:
    """``manage.py ARGS`` as an operator runs it beside ``server`` (its environment)."""
    return subprocess.run([python_bin(), "manage.py", *args], cwd=ROOT, env=server.env(),
                          capture_output=True, text=True, timeout=120)


@embedded_only
@pytest.mark.e2e
@pytest.mark.skipif(not store_enabled(), reason="needs the transcript store (OMNI_SESSION_STORE)")
def test_a_backup_taken_during_turns_restores_into_a_fresh_data_dir_and_a_thread_resumes(tmp_path):
    live = Server(tmp_path / "live", None)  # the embedded file <data dir>/sessions.db
    live.start()
    try:
        thread = new_id("bk")
        first = live.chat("Remember the lighthouse", "ava", thread).assert_ok()
        live.chat("And the harbour", "ava", thread).assert_ok()

        # Turns on other threads keep writing while the copy is made.
        errors: list[str] = []
        stop = threading.Event()

        def chatter(n: int):
            other = new_id(f"bk-busy{n}")
            while not stop.is_set():
                result = live.chat(f"Busy message {n}", "ava", other)
                if result.status != 200 or result.last["type"] != "done":
                    errors.append(result.describe())

        busy = [threading.Thread(target=chatter, args=(n,)) for n in range(3)]
        for t in busy:
            t.start()
        try:
            # one turn is certainly mid-stream during the backup
            with live.open_sse("/api/chat", {"message": "Midway", "resourceId": "ava",
                                             "threadId": new_id("bk-mid")}) as midway:
                midway.read_until("session")
                copy = tmp_path / "backup.db"
                made = manage(live, "backup", str(copy))
                midway.result()
        finally:
            stop.set()
            for t in busy:
                t.join(120)
        assert made.returncode == 0, made.stderr
        assert "Backed up" in made.stdout, made.stdout
        assert not errors, errors
        # The server went on meanwhile (WAL: the copy blocked no writer).
        live.chat("After the backup", "ava", thread).assert_ok()
    finally:
        live.stop()

    # The copy alone: one file, checked, holding the thread and its transcript.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("backup")) == ["backup.db"]
    assert rows(copy, "PRAGMA quick_check") == [("ok",)]
    assert rows(copy, "SELECT session_id FROM sessions_app_sessionmapping WHERE thread_id = "
                      f"'{thread}'") == [(first.session_id,)]

    # Restore into a fresh data dir: no CLI config dir, nothing of the old server.
    fresh = tmp_path / "restored"
    fresh.mkdir()
    shutil.copyfile(copy, fresh / "sessions.db")
    restored = Server(fresh, None)
    restored.start()
    try:
        assert not restored.local_transcripts(first.session_id)
        again = restored.chat("What did I say?", "ava", thread).assert_ok()
        assert again.session["resumed"] is True and again.session_id == first.session_id
        # the earlier messages came from the database (the message after the backup is not there)
        assert again.text == reply("What did I say?", "Remember the lighthouse", "And the harbour")
        restored.wait_log(f"Resuming session: {first.session_id}")
        listed = {s["threadId"] for s in restored.sessions("ava")["sessions"]}
        assert thread in listed
    finally:
        restored.stop()
