"""The libSQL engine's remote path (``DATABASE_URL=ws://...``) against a real
Hrana server: ``tests/hrana_server.py``, the stdlib sqlite3 behind the
protocol libsql-client speaks, since no sqld can run here.

Django runs in subprocesses with their own ``DATABASE_URL`` and
``OMNI_DATA_DIR``, so these tests pass whatever database the test session
itself is configured with; the backing file is checked directly.
"""

import atexit
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.hrana_server import start_hrana_server

# Django runs against the libSQL server in subprocesses: whatever the run's engine.
pytestmark = pytest.mark.engine_agnostic

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def run_django(code_or_args, url: str, data_dir: Path, *, timeout: float = 180,
               **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``manage.py ARGS`` (a list) or a Python snippet (a str) with
    Django set up against ``url`` (and ``extra_env``)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "omni.settings",
        "DATABASE_URL": url,
        "OMNI_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    if isinstance(code_or_args, str):
        code = "import django\ndjango.setup()\n" + textwrap.dedent(code_or_args)
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "manage.py", *code_or_args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


_migrated: Path | None = None  # a libSQL server's file the engine migrated, once per test run


def migrated_libsql_file() -> Path:
    """A database file that a libSQL server (Hrana) held while the engine
    migrated it (the migration itself is tested by ``test_migrate_over_hrana``):
    made once per test run, then copied for each server that needs one."""
    global _migrated
    if _migrated is None or not _migrated.exists():
        root = Path(tempfile.mkdtemp(prefix="omni-libsql-"))
        atexit.register(shutil.rmtree, root, True)
        server = start_hrana_server(root / "migrated.db", token="t0ken")
        try:
            proc = run_django(["migrate", "--noinput"], f"{server.url}?authToken=t0ken", root / "data",
                              timeout=300)
            assert proc.returncode == 0, output(proc)
        finally:
            server.stop()
        _migrated = root / "migrated.db"
    return _migrated


def on_a_libsql_server(tmp_path: Path, script: str, **extra_env: str) -> subprocess.CompletedProcess:
    """``script`` run with Django on a fresh libSQL server (Hrana, this
    suite's own) holding a migrated database (:func:`migrated_libsql_file`);
    fails the test if it fails."""
    shutil.copyfile(migrated_libsql_file(), tmp_path / "remote.db")
    server = start_hrana_server(tmp_path / "remote.db", token="t0ken")
    try:
        proc = run_django(script, f"{server.url}?authToken=t0ken", tmp_path / "data", timeout=300, **extra_env)
        assert proc.returncode == 0, output(proc)
    finally:
        server.stop()
    return proc


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A Hrana server over a fresh file, migrated through the engine."""
    tmp = tmp_path_factory.mktemp("hrana")
    db_path = tmp / "remote.db"
    server = start_hrana_server(db_path, token=TOKEN)
    url = f"{server.url}?authToken={TOKEN}"
    migrate = run_django(["migrate", "--noinput"], url, tmp / "data")
    try:
        yield {"server": server, "url": url, "db_path": db_path, "tmp": tmp, "migrate": migrate}
    finally:
        server.stop()


def backing(remote) -> sqlite3.Connection:
    return sqlite3.connect(remote["db_path"])


def test_migrate_over_hrana(remote):
    proc = remote["migrate"]
    assert proc.returncode == 0, output(proc)
    assert "Applying sessions_app.0001_initial... OK" in proc.stdout
    with backing(remote) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        applied = db.execute("SELECT count(*) FROM django_migrations WHERE app = 'sessions_app'").fetchone()[0]
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"django_migrations", "sessions_app_sessionmapping", "auth_user"} <= tables
    assert applied >= 1
    assert "idx_session_resource" in indexes
    # Nothing was written to the local default file instead.
    assert not (remote["tmp"] / "data" / "sessions.db").exists()


ORM_SCRIPT = """
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models import Count, F, Max, Q

from sessions_app.models import SessionMapping as M

assert connection.vendor == "sqlite" and connection.is_remote, connection.settings_dict
M.objects.all().delete()

# Create / read.
a = M.objects.create(thread_id="t1", resource_id="r1", session_id="s1")
b = M.objects.create(thread_id="t2", resource_id="r1", session_id="s2", title="héllo ✓ 'quoted' %s")
assert isinstance(a.pk, int) and b.pk > a.pk, (a.pk, b.pk)
got = M.objects.get(thread_id="t2", resource_id="r1")
assert (got.pk, got.title, got.agent, got.message_count) == (b.pk, "héllo ✓ 'quoted' %s", "smart", 0)
assert got.forked_from_thread_id is None
assert M.objects.count() == 2 and M.objects.filter(resource_id="r1").exists()

# Update: queryset rowcount, save(), F() expressions.
assert M.objects.filter(pk=a.pk).update(session_id="s1b") == 1
assert M.objects.filter(resource_id="nobody").update(title="x") == 0
a.refresh_from_db()
assert a.session_id == "s1b"
a.title = "renamed"
a.save()
M.objects.filter(pk=a.pk).update(message_count=F("message_count") + 3)
a.refresh_from_db()
assert (a.title, a.message_count) == ("renamed", 3)

# Datetimes: an aware value in another zone round-trips (as UTC).
when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt_timezone(timedelta(hours=2)))
M.objects.filter(pk=a.pk).update(updated_at=when)
M.objects.filter(pk=b.pk).update(updated_at=when + timedelta(hours=1))
a.refresh_from_db()
assert a.updated_at == when and a.updated_at.utcoffset() == timedelta(0), a.updated_at
assert a.created_at.tzinfo is not None

# __lt / __gte / __range on datetimes; ordering by -updated_at.
assert list(M.objects.filter(updated_at__lt=when + timedelta(minutes=1)).values_list("thread_id", flat=True)) == ["t1"]
assert M.objects.filter(updated_at__gte=when).count() == 2
assert M.objects.filter(updated_at__range=(when, when + timedelta(hours=1))).count() == 2
assert [m.thread_id for m in M.objects.order_by("-updated_at")] == ["t2", "t1"]
assert [m.thread_id for m in M.objects.all()] == ["t2", "t1"]  # Meta.ordering
assert M.objects.aggregate(last=Max("updated_at"))["last"] == when + timedelta(hours=1)
assert list(M.objects.values("resource_id").annotate(n=Count("id"))) == [{"resource_id": "r1", "n": 2}]
assert M.objects.filter(Q(title__icontains="LLO ✓ 'QUOTED' %s") | Q(title__startswith="ren")).count() == 2

# atomic() that raises leaves nothing.
try:
    with transaction.atomic():
        M.objects.create(thread_id="t3", resource_id="r1", session_id="s3")
        assert connection.connection.in_transaction
        raise RuntimeError("boom")
except RuntimeError:
    pass
assert not M.objects.filter(thread_id="t3").exists()
assert not connection.connection.in_transaction

# UniqueConstraint violation -> IntegrityError.
try:
    M.objects.create(thread_id="t1", resource_id="r1", session_id="dup")
except IntegrityError as exc:
    assert "UNIQUE" in str(exc), exc
else:
    raise AssertionError("duplicate (thread_id, resource_id) was accepted")

# A nested atomic() rolled back to its savepoint; the outer one commits.
with transaction.atomic():
    M.objects.create(thread_id="t4", resource_id="r1", session_id="s4")
    try:
        with transaction.atomic():
            M.objects.create(thread_id="t1", resource_id="r1", session_id="dup")
    except IntegrityError:
        pass
    M.objects.create(thread_id="t5", resource_id="r1", session_id="s5")
assert not connection.connection.in_transaction
obj, created = M.objects.get_or_create(thread_id="t1", resource_id="r1", defaults={"session_id": "x"})
assert (obj.pk, created) == (a.pk, False)
obj, created = M.objects.update_or_create(thread_id="t6", resource_id="r2", defaults={"session_id": "s6"})
assert created

# bulk_create, and executemany (stored SQL + batch on the wire).
M.objects.bulk_create([M(thread_id=f"b{i}", resource_id="r3", session_id=f"sb{i}") for i in range(3)])
with connection.cursor() as cursor:
    cursor.executemany(
        "UPDATE sessions_app_sessionmapping SET message_count = %s WHERE thread_id = %s",
        [(10, "b0"), (11, "b1"), (12, "b2")],
    )
    assert cursor.rowcount == 3, cursor.rowcount
    cursor.execute("SELECT thread_id FROM sessions_app_sessionmapping WHERE message_count > %(n)s", {"n": 10})
    assert sorted(r[0] for r in cursor.fetchall()) == ["b1", "b2"]

# More rows than Django's fetch chunk (100): none lost at chunk boundaries.
M.objects.bulk_create([M(thread_id=f"many{i}", resource_id="r4", session_id="s") for i in range(250)])
assert len(list(M.objects.filter(resource_id="r4"))) == 250
M.objects.filter(resource_id="r4").delete()

# Delete.
deleted, _ = M.objects.filter(resource_id="r3").delete()
assert deleted == 3, deleted
M.objects.get(thread_id="t2").delete()
assert not M.objects.filter(thread_id="t2").exists()

# A fresh connection (a new stream) sees everything committed.
connection.close()
assert sorted(M.objects.values_list("thread_id", flat=True)) == ["t1", "t4", "t5", "t6"]

# Known limit: lookups that need Django's Python SQL functions.
try:
    M.objects.filter(updated_at__month=5).count()
except OperationalError as exc:
    assert "no such function: django_datetime_extract" in str(exc), exc
else:
    raise AssertionError("__month worked remotely: update the engine's documented limits")

# The thread lease's one-statement take (INSERT ... ON CONFLICT DO UPDATE
# ... WHERE ... RETURNING): new, held, released and taken again.
from chat_app import leases
first = leases.acquire_sync("r", "leased", "turn-1")
assert isinstance(first, leases.Lease) and first.token == 1, first
assert isinstance(leases.acquire_sync("r", "leased", "turn-2"), leases.Busy)
first.release_sync()
again = leases.acquire_sync("r", "leased", "turn-3")
assert isinstance(again, leases.Lease) and again.token == 2 and again.held_sync() and not first.held_sync()
print("REMOTE ORM OK")
"""


def test_orm_over_hrana(remote):
    assert remote["migrate"].returncode == 0, output(remote["migrate"])
    proc = run_django(ORM_SCRIPT, remote["url"], remote["tmp"] / "data")
    assert proc.returncode == 0 and "REMOTE ORM OK" in proc.stdout, output(proc)
    with backing(remote) as db:
        rows = db.execute(
            "SELECT thread_id, session_id, updated_at FROM sessions_app_sessionmapping ORDER BY thread_id"
        ).fetchall()
    assert [r[0] for r in rows] == ["t1", "t4", "t5", "t6"]
    # Stored as Django's SQLite backend stores aware datetimes: naive UTC text.
    assert rows[0][1:] == ("s1b", "2024-05-06 05:08:09.123456")
    # The client really used the stream, stored-SQL and batch requests.
    seen = remote["server"].seen
    assert {"open_stream", "execute", "store_sql", "batch", "close_sql", "close_stream"} <= set(seen), seen


WRONG_TOKEN_SCRIPT = """
import threading
from django.db import DatabaseError, connection
for attempt in range(3):
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        print("REFUSED", type(exc).__name__, exc)
    else:
        print("CONNECTED")
# Each refused connection was closed: no client event-loop thread left.
print("threads", threading.active_count())
"""


@pytest.mark.parametrize("query", ["?authToken=wrong", ""], ids=["wrong-token", "no-token"])
def test_bad_token_is_refused(remote, query):
    url = remote["server"].url + query
    proc = run_django(WRONG_TOKEN_SCRIPT, url, remote["tmp"] / "data")
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("REFUSED") == 3 and "CONNECTED" not in proc.stdout, output(proc)
    assert "threads 1\n" in proc.stdout, output(proc)


def test_fake_server_speaks_what_the_client_expects(remote):
    """The server itself, through libsql-client's DB-API without Django:
    value types, named arguments, a transaction across requests, scripts."""
    from libsql_client import dbapi2

    conn = dbapi2.connect(remote["url"], isolation_level=None)
    try:
        conn.executescript(
            "CREATE TABLE probe (id INTEGER PRIMARY KEY, t TEXT UNIQUE, f REAL, b BLOB);"
            "INSERT INTO probe (t) VALUES ('semi;colon');"
        )
        cur = conn.execute("INSERT INTO probe (t, f, b) VALUES (?, ?, ?)", ("x", 1.5, b"\x00\xff"))
        assert (cur.lastrowid, cur.rowcount) == (2, 1)
        assert conn.execute("SELECT t, f, b, NULL FROM probe WHERE id = :id", {"id": 2}).fetchall() == [
            ("x", 1.5, b"\x00\xff", None)
        ]
        conn.execute("BEGIN")
        conn.execute("DELETE FROM probe")
        conn.rollback()
        assert conn.execute("SELECT t FROM probe ORDER BY id").fetchall() == [("semi;colon",), ("x",)]
        with pytest.raises(dbapi2.IntegrityError, match="UNIQUE"):
            conn.execute("INSERT INTO probe (t) VALUES ('x')")
        with pytest.raises(dbapi2.OperationalError, match="no such table"):
            conn.execute("SELECT * FROM nowhere")
        conn.execute("DROP TABLE probe")
    finally:
        conn.close()
