"""The database engine: ``DATABASE_URL`` parsing (contract §2) and the
embedded libSQL file's settings (WAL, busy timeout, concurrent writers)."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, connection, connections, transaction

from omni.db.libsql.base import is_remote, remote_url
from omni.db.urls import LIBSQL_ENGINE, database_from_url
from sessions_app.models import SessionMapping

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/srv/omni-data")

embedded_only = pytest.mark.skipif(
    connection.vendor != "sqlite" or connection.settings_dict["NAME"].startswith(("libsql:", "ws:", "wss:")),
    reason="the embedded libSQL file only",
)


# --- DATABASE_URL


@pytest.mark.parametrize("unset", [None, ""])
def test_unset_is_the_libsql_file_in_the_data_dir(unset):
    config = database_from_url(unset, DATA)
    assert config["ENGINE"] == LIBSQL_ENGINE
    assert config["NAME"] == str(DATA / "sessions.db")
    # tests get a file of their own beside it, never an in-memory database
    assert config["TEST"]["NAME"] not in (config["NAME"], ":memory:", "", None)
    assert Path(config["TEST"]["NAME"]).parent == DATA


@pytest.mark.parametrize(
    "url, name",
    [
        ("file:/x/y.db", "/x/y.db"),
        ("file:///x/y.db", "/x/y.db"),
        ("file:relative/y.db", "relative/y.db"),
        ("/x/y.db", "/x/y.db"),
        ("relative/y.db", "relative/y.db"),
        ("y.db", "y.db"),
    ],
)
def test_a_file_url_or_plain_path_is_an_embedded_libsql_file(url, name):
    config = database_from_url(url, DATA)
    assert config["ENGINE"] == LIBSQL_ENGINE
    assert config["NAME"] == name
    assert not is_remote(config["NAME"])
    assert config["TEST"]["NAME"] != config["NAME"]


def test_libsql_url_keeps_the_token_out_of_the_name():
    config = database_from_url("libsql://db-org.turso.io?authToken=T0KEN", DATA)
    assert config["ENGINE"] == LIBSQL_ENGINE
    assert config["NAME"] == "libsql://db-org.turso.io"
    assert "T0KEN" not in config["NAME"]
    assert config["OPTIONS"]["auth_token"] == "T0KEN"
    assert is_remote(config["NAME"])


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_ws_and_wss_urls_are_a_libsql_server(scheme):
    config = database_from_url(f"{scheme}://127.0.0.1:8080?authToken=abc", DATA)
    assert config["ENGINE"] == LIBSQL_ENGINE
    assert config["NAME"] == f"{scheme}://127.0.0.1:8080"
    assert config["OPTIONS"]["auth_token"] == "abc"
    assert is_remote(config["NAME"])


def test_a_libsql_server_without_a_token():
    config = database_from_url("ws://localhost:8080", DATA)
    assert config["NAME"] == "ws://localhost:8080"
    assert not config["OPTIONS"].get("auth_token")


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_url(scheme):
    config = database_from_url(f"{scheme}://user:secret@db.example:5433/omni", DATA)
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("omni", "user", "secret")
    assert (config["HOST"], int(config["PORT"])) == ("db.example", 5433)


def test_postgres_connections_give_up_after_a_few_seconds():
    # a black-holed host would otherwise hold each connection attempt ~2 minutes
    config = database_from_url("postgres://u@db.example/omni", DATA)
    assert 1 < config["OPTIONS"]["connect_timeout"] <= 5


def test_a_postgres_urls_own_options_are_kept():
    config = database_from_url("postgres://u@db.example/omni?connect_timeout=10&sslmode=require", DATA)
    assert config["OPTIONS"]["connect_timeout"] == 10
    assert config["OPTIONS"]["sslmode"] == "require"


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "redis://localhost:6379/0", "http://example.com/db", "oracle://x"]
)
def test_an_unknown_scheme_is_improperly_configured(url):
    with pytest.raises(ImproperlyConfigured):
        database_from_url(url, DATA)


# --- the Hrana URL of a libSQL server


def test_remote_url_libsql_means_wss_with_the_token_as_auth_token():
    assert remote_url("libsql://db-org.turso.io", "T") == "wss://db-org.turso.io?authToken=T"


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_remote_url_keeps_ws_and_wss(scheme):
    assert remote_url(f"{scheme}://h:8080", "T") == f"{scheme}://h:8080?authToken=T"
    assert remote_url(f"{scheme}://h:8080", None) == f"{scheme}://h:8080"


def test_remote_url_keeps_other_query_parameters():
    url = remote_url("libsql://h/db?tls=1", "a b")
    assert url.startswith("wss://h/db?")
    assert "tls=1" in url and "authToken=a+b" in url


# --- the engine this run uses


def test_the_engine_follows_database_url():
    url = os.environ.get("DATABASE_URL", "")
    engine = settings.DATABASES["default"]["ENGINE"]
    if url.startswith(("postgres://", "postgresql://")):
        assert engine == "django.db.backends.postgresql"
        assert connection.vendor == "postgresql"
    elif not url:
        assert engine == LIBSQL_ENGINE
        assert connection.vendor == "sqlite"
        assert connection.display_name == "libSQL"
    else:
        assert engine == LIBSQL_ENGINE


@embedded_only
@pytest.mark.django_db
def test_the_test_database_is_a_file_not_memory():
    assert not connection.is_in_memory_db()
    assert Path(connection.settings_dict["NAME"]).is_file()


@embedded_only
@pytest.mark.django_db
def test_journal_mode_is_wal():
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0].lower() == "wal"


@embedded_only
@pytest.mark.django_db
def test_busy_timeout_is_set():
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] >= 1000  # milliseconds


@embedded_only
@pytest.mark.django_db
def test_transactions_take_the_write_lock_at_begin():
    assert (connection.transaction_mode or "").upper() == "IMMEDIATE"


ROWS = 60


def write_rows(prefix: str, n: int = ROWS) -> None:
    """Read-then-write transactions: the pattern that fails with "database is
    locked" at once (whatever the busy timeout) when transactions are
    deferred and another connection writes in between."""
    for i in range(n):
        with transaction.atomic():
            SessionMapping.objects.filter(resource_id="writers").count()
            SessionMapping.objects.create(
                thread_id=f"{prefix}-{i}", resource_id="writers", session_id=f"s-{prefix}-{i}"
            )


@embedded_only
@pytest.mark.django_db(transaction=True)
def test_writers_in_two_threads_do_not_lock_each_other_out():
    errors, barrier = [], threading.Barrier(3)

    def worker(prefix):
        try:
            barrier.wait(timeout=10)
            write_rows(prefix)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("a", "b")]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=10)
    write_rows("main")
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert SessionMapping.objects.filter(resource_id="writers").count() == 3 * ROWS


WRITER = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from django.db import connection, transaction
    from sessions_app.models import SessionMapping
    assert connection.vendor == "sqlite", connection.vendor
    print("ready", flush=True)
    sys.stdin.readline()  # go
    for i in range(int(sys.argv[1])):
        with transaction.atomic():
            SessionMapping.objects.filter(resource_id="writers").count()
            SessionMapping.objects.create(
                thread_id=f"proc-{i}", resource_id="writers", session_id=f"s-proc-{i}"
            )
    print("done", flush=True)
    """
)


@embedded_only
@pytest.mark.django_db(transaction=True)
def test_another_process_writes_the_same_file_concurrently(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "omni.settings",
        "OMNI_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": "file:" + connection.settings_dict["NAME"],
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ROWS * 2)],
        cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        write_rows("main", ROWS * 2)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "locked" not in err
    assert out.strip() == "done"
    close_old_connections()
    assert SessionMapping.objects.filter(resource_id="writers").count() == 4 * ROWS
    assert SessionMapping.objects.filter(thread_id__startswith="proc-").count() == 2 * ROWS


# --- connections on a live server


def open_database_files(pid: int, database: Path) -> int:
    """How many file descriptors of process ``pid`` have ``database`` open
    (one per connection; the WAL and shared-memory files not counted)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == str(database)
        except OSError:  # closed meanwhile
            pass
    return count


def settled(count, settle: float = 3) -> int:
    """``count()`` once it stops falling: a request finishes (and closes its
    connection) just after the client has read its response."""
    import time

    deadline = time.monotonic() + settle
    now = count()
    while now > 1 and time.monotonic() < deadline:  # 1: the turns' thread's own
        time.sleep(0.05)
        now = count()
    return now


@pytest.fixture
def daphne(tmp_path_factory):
    from tests.e2e import serving

    yield from serving(tmp_path_factory)


def test_requests_close_their_connections_and_turns_keep_theirs(daphne):
    server, pg = daphne, daphne.postgres
    if pg:
        def connections():
            return pg.connections()
        most = 1
    else:
        def connections():
            return open_database_files(server.proc.pid, server.data_dir / "sessions.db")
        # SQLite keeps a closed connection's descriptor for reuse while
        # another connection of the process holds locks on the file: the
        # turns' connection and at most one closed one show.
        most = 2
    server.chat("hello", "conn-user", "conn-thread").assert_ok()
    # The turns' database thread keeps its connection (CONN_MAX_AGE=None):
    # the next turn opens none.
    assert 1 <= settled(connections) <= most
    for _ in range(60):
        status, _ = server.get_json("/api/sessions", resourceId="conn-user")
        assert status == 200
    # Each request ran on a thread of its own and closed its connection
    # when it finished, not at garbage collection.
    assert 1 <= settled(connections) <= most
    server.chat("again", "conn-user", "conn-thread").assert_ok()
    assert 1 <= settled(connections) <= most
