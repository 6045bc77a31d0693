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

PostgreSQL and libSQL servers have their own tools (``pg_dump``; the
server's snapshots or dumps): the command refuses them.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections

from sessions_app.models import SessionMapping, TranscriptEntry

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
            "This command copies the embedded libSQL file only.")
    if vendor != "sqlite":
        raise CommandError(f"The database is {connection.display_name}: back it up with its own tools. "
                           "This command copies the embedded libSQL file only.")
    if getattr(connection, "is_remote", False):
        parts = urlsplit(name)  # the scheme and host only: the URL may carry a token
        raise CommandError(
            f"The database is a libSQL server ({parts.scheme}://{parts.hostname}): back it up with the "
            "server's own tooling (sqld's snapshots, Turso's point-in-time restore or "
            "`turso db shell <database> .dump`). This command copies the embedded libSQL file only.")
    if connection.is_in_memory_db():
        raise CommandError("The database is in memory: there is no file to back up.")
    path = Path(name.removeprefix("file:")).expanduser()
    if not path.is_file():
        raise CommandError(f"No database at {path} (run `manage.py migrate` to create it).")
    return path


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


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Command(BaseCommand):
    help = ("Write a consistent copy of the embedded libSQL database to PATH (a file, or a directory "
            "for a timestamped file), while the server runs.")

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
        # Mode 0600 (mkstemp): the copy holds every conversation. An empty
        # file is an empty database to SQLite.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            copy_database(source, tmp)
            fsync(tmp)
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
        threads, entries = counts(target)
        self.stdout.write(
            f"Backed up {source} to {target}: {target.stat().st_size} bytes, "
            f"{threads} threads, {entries} transcript entries")
