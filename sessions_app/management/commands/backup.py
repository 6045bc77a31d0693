"""``manage.py backup PATH [--force]``

Writes a consistent copy of the embedded libSQL database (the SQLite file
``<OMNI_DATA_DIR>/sessions.db``, or the ``DATABASE_URL`` file) to ``PATH``,
while the server runs. The file runs in WAL mode: recent commits sit in
``sessions.db-wal`` until a checkpoint, so copying ``sessions.db`` alone (or
the two files one after the other while they change) is not a backup.

The copy is made with SQLite's online backup API (``sqlite3.Connection.backup``)
in one step, inside one read transaction: a snapshot of the last commit before
it started, every table at the same moment. Writers are not blocked meanwhile
(WAL readers and writers do not wait for each other). The copy is written to a
temporary file beside ``PATH``, switched to a single self-contained file
(``journal_mode=DELETE``), checked (``PRAGMA quick_check``), synced, and only
then given its name: ``PATH`` never holds a partial copy.

``PATH`` an existing directory: the copy is ``sessions-<UTC time>.db`` in it.
An existing file is never overwritten without ``--force``, and a file of the
live database (the database itself, its ``-wal``, ``-shm`` or ``-journal``,
also through a symlink or a hard link) never, even with ``--force``.

Restore: stop the server, put the copy in place as the database file
(``<OMNI_DATA_DIR>/sessions.db``; remove a ``sessions.db-wal`` and
``sessions.db-shm`` left beside it), start it. The CLI's config dir
(``CLAUDE_CONFIG_DIR``) need not be restored: it is a cache, and a turn
resumes a thread from the transcript in the database.

Attachments (contract §11) kept as local files (``OMNI_ATTACHMENT_STORAGE``
unset: ``<OMNI_DATA_DIR>/attachments/``) are copied beside the copy, into
``PATH.attachments/``: the files the copy's rows name, and only those. A
file is written once before its row commits and never changed (names are
never reused), so a file named in the snapshot is complete; a file written
during the backup without a row in the snapshot is not needed; a file
deleted during the backup (its thread deleted after the snapshot) is left
out with its rows, deleted from the copy, as if that delete came first. The
directory is made under a temporary name and renamed into place before the
database copy is (no attachments: no directory). Restore:
``PATH.attachments/`` as ``<OMNI_DATA_DIR>/attachments/``.

Attachments in an S3 bucket (``OMNI_ATTACHMENT_STORAGE=s3://...``) are not
copied: back the bucket up with its own tools (versioning, replication,
``aws s3 sync``). The command says so.

PostgreSQL and libSQL servers have their own tools (``pg_dump``; the
server's snapshots or dumps): the command refuses them (and names the
attachments' directory to copy).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections

from sessions_app.attachments.storage import describe
from sessions_app.models import Attachment, AttachmentUse, SessionMapping, TranscriptEntry

BUSY_TIMEOUT = 20  # seconds to wait for a lock held by a server process (as the engine does)


def source_file(connection) -> Path:
    """The database file behind ``connection``; CommandError for anything
    this command cannot copy (PostgreSQL, a libSQL server, memory)."""
    vendor = connection.vendor
    name = str(connection.settings_dict.get("NAME") or "")
    if vendor == "postgresql":
        raise CommandError(
            "The database is PostgreSQL: back it up with PostgreSQL's own tools, e.g. "
            "pg_dump --format=custom --file=omni.dump \"$DATABASE_URL\" (restore with pg_restore). "
            "This command copies the embedded libSQL file only." + attachments_hint())
    if vendor != "sqlite":
        raise CommandError(f"The database is {connection.display_name}: back it up with its own tools. "
                           "This command copies the embedded libSQL file only." + attachments_hint())
    if getattr(connection, "is_remote", False):
        parts = urlsplit(name)  # the scheme and host only: the URL may carry a token
        raise CommandError(
            f"The database is a libSQL server ({parts.scheme}://{parts.hostname}): back it up with the "
            "server's own tooling (sqld's snapshots, Turso's point-in-time restore or "
            "`turso db shell <database> .dump`). This command copies the embedded libSQL file only."
            + attachments_hint())
    if connection.is_in_memory_db():
        raise CommandError("The database is in memory: there is no file to back up.")
    path = Path(name.removeprefix("file:")).expanduser()
    if not path.is_file():
        raise CommandError(f"No database at {path} (run `manage.py migrate` to create it).")
    return path


def local_attachments() -> Path | None:
    """The directory of the attachments' files, or None (S3)."""
    config = settings.STORAGES["attachments"]
    if config["BACKEND"].endswith("FileSystemStorage"):
        return Path(config["OPTIONS"]["location"])
    return None


def attachments_hint() -> str:
    folder = local_attachments()
    if folder is None:
        return (f" Attachments are in {describe(settings.STORAGES['attachments'])}: back up the bucket "
                "with its own tools.")
    return (f" Copy the attachments' directory {folder} too, after the dump (files are written once, "
            "never changed).")


def attachments_dir(target: Path) -> Path:
    return target.with_name(f"{target.name}.attachments")


def refuse_live_attachments(target_dir: Path) -> None:
    folder = local_attachments()
    if folder is None:
        return
    live, there = folder.resolve(), target_dir.resolve()
    if there == live or live in there.parents or there in live.parents:
        raise CommandError(f"{target_dir} would be (or hold) the live attachments' directory {folder}: "
                           "choose another path")


def copy_attachments(copy: Path, folder: Path, into: Path) -> tuple[int, int, int]:
    """Copy into ``into`` the files the rows of the database ``copy`` name;
    rows whose file is gone (deleted since the snapshot) are deleted from
    the copy. Returns (files, bytes, left out)."""
    table, uses = Attachment._meta.db_table, AttachmentUse._meta.db_table
    db = sqlite3.connect(copy)
    try:
        try:
            named = db.execute(f'SELECT id, storage_name FROM "{table}" ORDER BY id').fetchall()
        except sqlite3.OperationalError:  # not migrated that far
            return 0, 0, 0
        files = size = 0
        gone = []
        for pk, name in named:
            source, target = folder / name, into / name
            if folder.resolve() not in source.resolve().parents:
                gone.append(pk)  # never outside the directory
                continue
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target)
            except FileNotFoundError:
                gone.append(pk)
                continue
            os.chmod(target, 0o600)
            fsync(target)
            files += 1
            size += target.stat().st_size
        if gone:
            marks = ",".join("?" * len(gone))
            with db:
                db.execute(f'DELETE FROM "{uses}" WHERE attachment_id IN ({marks})', gone)
                db.execute(f'DELETE FROM "{table}" WHERE id IN ({marks})', gone)
    finally:
        db.close()
    return files, size, len(gone)


def target_file(path: Path) -> Path:
    if path.is_dir():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return path / f"sessions-{stamp}.db"
    return path


# The files of a live SQLite database beside its main file: its write-ahead
# log, the log's index, and a rollback journal. Writing any of them (even one
# that does not exist yet: a new -journal is "hot" and gets rolled back in)
# damages the database or loses its last commits.
LIVE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def live_files(source: Path) -> set[Path]:
    """Every file of the database ``source``, by resolved path: beside its
    name as configured and beside the file it resolves to (a symlink)."""
    found = set()
    for base in (source.absolute(), source.resolve()):
        for suffix in LIVE_SUFFIXES:
            found.add(Path(f"{base}{suffix}").resolve())
    return found


def refuse_live_file(target: Path, source: Path) -> None:
    """CommandError when ``target`` is (or links to) a file of the live
    database, with or without ``--force``."""
    live = live_files(source)
    hit = target.resolve() in live
    if not hit and target.exists():  # a hard link, or a path that resolves differently
        for path in live:
            try:
                if os.path.samefile(target, path):
                    hit = True
                    break
            except OSError:  # that file does not exist
                continue
    if hit:
        raise CommandError(
            f"{target} is a file of the live database ({source} and its -wal, -shm and -journal "
            "files are never overwritten): choose another path")


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of ``source`` (live, WAL mode) in the new file ``target``."""
    # (mode=rw: never creates a file; the backup only reads)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # pages=-1: one step, one read transaction, one snapshot
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            problems = [row[0] for row in dst.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise CommandError(f"The copy failed its integrity check: {'; '.join(problems[:5])}")
        finally:
            dst.close()
    finally:
        src.close()


def counts(path: Path) -> tuple[int, int]:
    """Threads and transcript entries in the copy."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        found = []
        for model in (SessionMapping, TranscriptEntry):
            try:
                found.append(db.execute(f'SELECT count(*) FROM "{model._meta.db_table}"').fetchone()[0])
            except sqlite3.OperationalError:  # not migrated that far
                found.append(0)
    finally:
        db.close()
    return found[0], found[1]


def place_directory(made: Path, target: Path, force: bool) -> None:
    """Rename the finished directory ``made`` to ``target``; an existing one
    is replaced with ``force`` (else CommandError)."""
    fsync(made)
    if target.exists() or target.is_symlink():
        if not force:
            raise CommandError(f"{target} exists: use --force to overwrite it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(made, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(made, target)
    fsync(target.parent)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Command(BaseCommand):
    help = ("Write a consistent copy of the embedded libSQL database to PATH (a file, or a directory "
            "for a timestamped file), while the server runs, and the attachments' files it names "
            "(<OMNI_DATA_DIR>/attachments/) to PATH.attachments/. Attachments in an S3 bucket are "
            "not backed up: back the bucket up with its own tools.")

    def add_arguments(self, parser):
        parser.add_argument("path", help="the copy's file name, or an existing directory")
        parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS,
                            help="the database alias (default: %(default)s)")

    def handle(self, *args, path: str, force: bool, database: str, **options):
        source = source_file(connections[database])
        target = target_file(Path(path).expanduser())
        if not target.parent.is_dir():
            raise CommandError(f"No directory {target.parent}")
        refuse_live_file(target, source)
        if target.exists() and not force:
            raise CommandError(f"{target} exists: use --force to overwrite it")
        folder, files_dir = local_attachments(), attachments_dir(target)
        if folder is not None:
            refuse_live_attachments(files_dir)
            if files_dir.exists() and not force:
                raise CommandError(f"{files_dir} exists: use --force to overwrite it")
        # Mode 0600 (mkstemp): the copy holds every conversation. An empty
        # file is an empty database to SQLite.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        tmp_files = None
        attached = (0, 0, 0)
        try:
            copy_database(source, tmp)
            if folder is not None:
                tmp_files = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{files_dir.name}.", suffix=".tmp"))
                attached = copy_attachments(tmp, folder, tmp_files)
                if attached[0] == 0:
                    shutil.rmtree(tmp_files)
                    tmp_files = None
            fsync(tmp)
            if tmp_files is not None:
                place_directory(tmp_files, files_dir, force)
                tmp_files = None
            if force:
                os.replace(tmp, target)
            else:
                try:
                    os.link(tmp, target)  # fails if PATH appeared meanwhile: never overwritten
                except FileExistsError:
                    raise CommandError(f"{target} exists: use --force to overwrite it") from None
                except OSError:  # no hard links on this filesystem
                    if target.exists():
                        raise CommandError(f"{target} exists: use --force to overwrite it") from None
                    os.replace(tmp, target)
            fsync(target.parent)
        finally:
            for leftover in (tmp, Path(f"{tmp}-journal")):
                leftover.unlink(missing_ok=True)
            if tmp_files is not None:
                shutil.rmtree(tmp_files, ignore_errors=True)
        threads, entries = counts(target)
        self.stdout.write(
            f"Backed up {source} to {target}: {target.stat().st_size} bytes, "
            f"{threads} threads, {entries} transcript entries")
        files, size, left_out = attached
        if folder is None:
            self.stdout.write(
                f"Attachments are kept in {describe(settings.STORAGES['attachments'])}: NOT in this backup. "
                "Back up the bucket with its own tools (versioning, replication, aws s3 sync).")
        elif files:
            self.stdout.write(
                f"Copied {files} attachment files ({size} bytes) from {folder} to {files_dir}"
                + (f"; {left_out} deleted meanwhile left out" if left_out else "")
                + f". Restore: {files_dir.name} as <OMNI_DATA_DIR>/attachments.")
        else:
            self.stdout.write(f"No attachment files to copy (from {folder})"
                              + (f"; {left_out} deleted meanwhile left out." if left_out else "."))
