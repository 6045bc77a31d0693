"""``manage.py prune_sessions --older-than AGE [--dry-run] [--batch-size N]``:
threads idle for longer than AGE go with their transcript rows and local
files; transcripts no mapping points at that were last written before the
cutoff go too; everything newer stays."""

import time
import uuid
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from sessions_app import services
from sessions_app.models import SessionMapping, TranscriptEntry, TranscriptSummary
from sessions_app.transcripts import DjangoSessionStore

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("config_dir")]

PROJECT = "-srv-omni-workspace"
DAY_MS = 24 * 3600 * 1000


def store_transcript(config_dir: Path, session_id: str) -> list[Path]:
    """Rows (main and subagent) and local files of a session, as a turn leaves them."""
    store = DjangoSessionStore()
    key = {"project_key": PROJECT, "session_id": session_id}
    async_to_sync(store.append)(key, [
        {"type": "user", "uuid": str(uuid.uuid4()), "message": {"role": "user", "content": "hi"}},
    ])
    async_to_sync(store.append)({**key, "subpath": "subagents/agent-1"}, [
        {"type": "user", "uuid": str(uuid.uuid4()), "isSidechain": True,
         "message": {"role": "user", "content": "sub"}},
    ])
    project = config_dir / "projects" / PROJECT
    main, sub = project / f"{session_id}.jsonl", project / session_id / "subagents" / "agent-1.jsonl"
    sub.parent.mkdir(parents=True)
    main.write_text("{}\n")
    sub.write_text("{}\n")
    return [main, project / session_id]


def thread(config_dir, thread_id, *, days_old: float, resource_id="alice") -> dict:
    sid = str(uuid.uuid4())
    async_to_sync(services.save_session)(thread_id, resource_id, sid, user_message="hello")
    SessionMapping.objects.filter(thread_id=thread_id, resource_id=resource_id).update(
        updated_at=timezone.now() - timedelta(days=days_old))
    # the transcript's own write time is not what ages a thread
    files = store_transcript(config_dir, sid)
    return {"thread": thread_id, "resource": resource_id, "sid": sid, "files": files}


def orphan(config_dir, *, days_old: float) -> dict:
    sid = str(uuid.uuid4())
    files = store_transcript(config_dir, sid)
    TranscriptSummary.objects.filter(session_id=sid).update(
        mtime_ms=time.time_ns() // 1_000_000 - int(days_old * DAY_MS))
    return {"sid": sid, "files": files}


def has_mapping(t) -> bool:
    return SessionMapping.objects.filter(thread_id=t["thread"], resource_id=t["resource"]).exists()


def rows(t) -> int:
    return (TranscriptEntry.objects.filter(session_id=t["sid"]).count()
            + TranscriptSummary.objects.filter(session_id=t["sid"]).count())


def assert_gone(t):
    if "thread" in t:
        assert not has_mapping(t)
    assert rows(t) == 0
    assert not any(path.exists() for path in t["files"]), t["files"]


def assert_kept(t):
    if "thread" in t:
        assert has_mapping(t)
    assert rows(t) == 3  # main line, subagent line, summary
    assert all(path.exists() for path in t["files"]), t["files"]


def prune(*args) -> str:
    out = StringIO()
    call_command("prune_sessions", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def world(config_dir):
    return {
        "old": thread(config_dir, "t-old", days_old=45),
        "old_bob": thread(config_dir, "t-old", days_old=31, resource_id="bob"),
        "new": thread(config_dir, "t-new", days_old=29),
        "fresh": thread(config_dir, "t-fresh", days_old=0),
        "old_orphan": orphan(config_dir, days_old=40),
        "new_orphan": orphan(config_dir, days_old=2),
    }


def test_old_threads_and_old_orphans_are_deleted(world):
    out = prune("--older-than", "30d")
    assert "Deleted 2 threads and 1 orphaned transcripts" in out, out
    assert_gone(world["old"])
    assert_gone(world["old_bob"])
    assert_gone(world["old_orphan"])
    assert_kept(world["new"])
    assert_kept(world["fresh"])
    assert_kept(world["new_orphan"])
    # a second run finds nothing left to do
    assert "Deleted 0 threads and 0 orphaned transcripts" in prune("--older-than", "30d")
    assert SessionMapping.objects.count() == 2


def test_dry_run_deletes_nothing_and_reports_counts(world):
    out = prune("--older-than", "30d", "--dry-run")
    assert "Would delete 2 threads and 1 orphaned transcripts" in out, out
    for t in world.values():
        assert_kept(t)


def test_units(world):
    assert "Would delete 0 threads" in prune("--older-than", "7w", "--dry-run")
    assert "Would delete 2 threads" in prune("--older-than", "720h", "--dry-run")
    # 28 days: t-new (29 days) is old now, the 2-day orphan is not
    assert "Would delete 3 threads and 1 orphaned" in prune("--older-than", "28d", "--dry-run")
    out = prune("--older-than", "1h")
    assert "Deleted 3 threads and 2 orphaned transcripts" in out, out
    assert_kept(world["fresh"])
    for name in ("old", "old_bob", "new", "old_orphan", "new_orphan"):
        assert_gone(world[name])


def test_an_old_thread_whose_session_a_new_thread_shares_keeps_the_transcript(config_dir):
    old = thread(config_dir, "t-old", days_old=60)
    async_to_sync(services.save_session)("t-copy", "alice", old["sid"])  # updated now
    assert "Deleted 1 threads" in prune("--older-than", "30d")
    assert not has_mapping(old)
    assert rows(old) == 3 and all(path.exists() for path in old["files"])


def test_batches_cover_every_old_thread(config_dir):
    old = [thread(config_dir, f"t-{n}", days_old=40 + n) for n in range(5)]
    new = thread(config_dir, "t-new", days_old=1)
    out = prune("--older-than", "30d", "--batch-size", "2")
    assert "Deleted 5 threads" in out, out
    for t in old:
        assert_gone(t)
    assert_kept(new)


@pytest.mark.parametrize("value", ["30", "abc", "-1d", "1.5d", "30 days", "d", ""])
def test_bad_ages_are_a_command_error(world, value):
    with pytest.raises(CommandError):
        call_command("prune_sessions", f"--older-than={value}", stdout=StringIO())
    for t in world.values():
        assert_kept(t)


def test_bad_age_as_a_separate_argument(world):
    for value in ("30", "abc", "-1d"):
        with pytest.raises(CommandError):
            call_command("prune_sessions", "--older-than", value, stdout=StringIO())
    assert SessionMapping.objects.count() == 4


def test_older_than_is_required():
    with pytest.raises(CommandError):
        call_command("prune_sessions", stdout=StringIO())


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_below_one_is_a_command_error(world, size):
    with pytest.raises(CommandError):
        call_command("prune_sessions", "--older-than", "30d", f"--batch-size={size}",
                     stdout=StringIO())
    for t in world.values():
        assert_kept(t)


def test_an_orphan_written_recently_under_another_project_key_is_kept(config_dir):
    """A session moved to another working directory has a summary per key:
    it is as recent as its latest write, under any key."""
    stale = orphan(config_dir, days_old=90)
    async_to_sync(DjangoSessionStore().append)(
        {"project_key": "-other-machine", "session_id": stale["sid"]},
        [{"type": "user", "uuid": str(uuid.uuid4()), "message": {"role": "user", "content": "x"}}])
    assert "Would delete 0 threads and 0 orphaned" in prune("--older-than", "30d", "--dry-run")
    assert "Deleted 0 threads and 0 orphaned" in prune("--older-than", "30d")
    assert rows(stale) == 5 and all(path.exists() for path in stale["files"])


def test_dry_run_counts_sessions_not_summary_rows(config_dir):
    stale = orphan(config_dir, days_old=90)
    async_to_sync(DjangoSessionStore().append)(
        {"project_key": "-other-machine", "session_id": stale["sid"]},
        [{"type": "user", "uuid": str(uuid.uuid4()), "message": {"role": "user", "content": "x"}}])
    TranscriptSummary.objects.filter(session_id=stale["sid"]).update(
        mtime_ms=time.time_ns() // 1_000_000 - 90 * DAY_MS)
    assert "Would delete 0 threads and 1 orphaned" in prune("--older-than", "30d", "--dry-run")
    assert "Deleted 0 threads and 1 orphaned" in prune("--older-than", "30d")
    assert_gone(stale)


def test_local_files_that_cannot_be_removed_do_not_stop_the_run(world, monkeypatch):
    real = services.erase_local_transcript
    stuck = world["old"]["sid"]

    def erase(session_id):
        if session_id == stuck:
            raise PermissionError(13, "Permission denied")
        return real(session_id)

    monkeypatch.setattr(services, "erase_local_transcript", erase)
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("prune_sessions", "--older-than", "30d", "--batch-size", "1",
                     stdout=StringIO(), stderr=err)
    assert "t-old" in err.getvalue() and "could not be removed" in err.getvalue()
    # the stuck thread's mapping and rows are gone all the same, and the rest went on
    assert not has_mapping(world["old"]) and rows(world["old"]) == 0
    assert_gone(world["old_bob"])
    assert_gone(world["old_orphan"])
    assert_kept(world["new"])
    assert_kept(world["new_orphan"])
