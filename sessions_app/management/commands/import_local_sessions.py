"""``manage.py import_local_sessions [--config-dir DIR]``

Copies the Claude Code CLI's local transcripts
(``<config dir>/projects/<project key>/<session id>.jsonl`` plus the
``<session id>/subagents/**`` files) into the database through
``DjangoSessionStore``, with the SDK's ``import_session_to_store``: the
project key is the on-disk project directory, exactly what the live mirror
would have used, so an imported session resumes like a mirrored one.

Idempotent: lines with a ``uuid`` already stored are skipped (the store's
unique key); lines without one (titles, tags, cost and mode markers) are
copied only into keys the store does not hold yet, so a second run, or a
run over sessions that were mirrored live, adds nothing twice. Ends with one
summary line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from asgiref.sync import async_to_sync
from claude_agent_sdk import import_session_to_store
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sessions_app.transcripts import DjangoSessionStore

try:  # the SDK's own session-id check (a UUID), as import_session_to_store applies it
    from claude_agent_sdk._internal.sessions import _validate_uuid
except ImportError:  # pragma: no cover - SDK layout changed
    import uuid as _uuid

    def _validate_uuid(value: str):
        try:
            _uuid.UUID(value)
        except ValueError:
            return None
        return value


class NewLinesOnly:
    """A ``SessionStore`` wrapper for the import: passes on only the lines the
    store lacks (see the module docstring) and counts them."""

    def __init__(self, store: DjangoSessionStore):
        self.store = store
        self.keys: dict[tuple, tuple[bool, set[str]]] = {}
        self.lines = 0

    async def append(self, key, entries):
        ident = (key["project_key"], key["session_id"], key.get("subpath") or "")
        if ident not in self.keys:  # first batch of this key in this run
            stored = await self.store.load(key)
            self.keys[ident] = (
                stored is None,
                {e["uuid"] for e in stored or () if isinstance(e.get("uuid"), str)},
            )
        new_key, uuids = self.keys[ident]
        fresh = []
        for entry in entries:
            uuid = entry.get("uuid")
            if isinstance(uuid, str) and uuid:
                if uuid in uuids:
                    continue
                uuids.add(uuid)
            elif not new_key:
                continue
            fresh.append(entry)
        if fresh:
            await self.store.append(key, fresh)
            self.lines += len(fresh)

    async def load(self, key):
        return await self.store.load(key)


@dataclass
class Report:
    lines: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self, config_dir: Path) -> str:
        sessions = self.new + self.updated
        return (
            f"Imported {self.lines} transcript line{'s' * (self.lines != 1)} from "
            f"{sessions} session{'s' * (sessions != 1)} ({self.new} new, {self.updated} updated); "
            f"{self.unchanged} already up to date, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed; from {config_dir / 'projects'}"
        )


@contextmanager
def claude_config_dir(path: Path):
    """``import_session_to_store`` finds files under ``$CLAUDE_CONFIG_DIR``."""
    before = os.environ.get("CLAUDE_CONFIG_DIR")
    os.environ["CLAUDE_CONFIG_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CLAUDE_CONFIG_DIR", None)
        else:
            os.environ["CLAUDE_CONFIG_DIR"] = before


def local_sessions(config_dir: Path) -> tuple[list[str], list[str]]:
    """(session ids to import, names of files that are not sessions)."""
    ids, skipped = [], []
    for path in sorted((config_dir / "projects").glob("*/*.jsonl")):
        if not _validate_uuid(path.stem):
            skipped.append(f"{path.parent.name}/{path.name}: not a session id")
        elif path.stat().st_size == 0:
            skipped.append(f"{path.parent.name}/{path.name}: empty")
        elif path.stem not in ids:  # the SDK imports the first project dir holding it
            ids.append(path.stem)
    return ids, skipped


async def import_local_sessions(config_dir: Path, store: DjangoSessionStore, log) -> Report:
    report = Report()
    session_ids, report.skipped = local_sessions(config_dir)
    for reason in report.skipped:
        log(f"skipped {reason}")
    with claude_config_dir(config_dir):
        for session_id in session_ids:
            target = NewLinesOnly(store)
            try:
                await import_session_to_store(session_id, target)
            except (OSError, ValueError) as exc:  # unreadable file, a bad JSON line
                report.failed.append(f"{session_id}: {exc}")
                log(f"FAILED {session_id}: {exc}")
            main_was_new = next(iter(target.keys.values()), (False, None))[0]
            report.lines += target.lines
            if not target.lines:
                report.unchanged += 1
            elif main_was_new:
                report.new += 1
            else:
                report.updated += 1
            log(f"{session_id}: {target.lines} new lines")
    return report


class Command(BaseCommand):
    help = (
        "Import the Claude Code CLI's local transcripts (CLAUDE_CONFIG_DIR/projects) "
        "into the database's session store. Safe to run again: nothing is added twice."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--config-dir",
            help="the Claude config dir to read (default: settings.CLAUDE_CONFIG_DIR)",
        )

    def handle(self, *args, config_dir=None, verbosity=1, **options):
        if config_dir is not None and not Path(config_dir).is_dir():
            raise CommandError(f"--config-dir {config_dir!r} is not a directory")
        path = Path(config_dir or settings.CLAUDE_CONFIG_DIR).expanduser().resolve()

        def log(line: str) -> None:
            if verbosity >= 2:
                self.stdout.write(line)

        report = async_to_sync(import_local_sessions)(path, DjangoSessionStore(), log)
        for failure in report.failed:
            self.stderr.write(f"failed: {failure}")
        self.stdout.write(report.summary(path))
        if report.failed:
            raise CommandError(f"{len(report.failed)} session(s) could not be imported")
