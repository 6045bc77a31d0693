"""A PostgreSQL restart and a short outage under a live worker (issue 22,
findings 3 and 4): a fault-injecting proxy (:mod:`tests.faults`) sits between
the worker and a database of its own on the shared PostgreSQL server, which
is never restarted itself.

* a restart (every connection cut, the database back at once) between turns:
  the next turn streams and is saved;
* a 10 s outage while a turn streams its reply: the turn waits for the
  database (its lease renewal and its last save retry), then is saved;
* an outage longer than the thread's lease: the turn ends with an ``error``
  that says its reply was not saved, and the thread goes on afterwards.

PostgreSQL: ``TEST_POSTGRES_URL`` (or the run's own ``DATABASE_URL`` when it is
PostgreSQL). Without it the module is skipped, except under ``CI=true``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e import PostgresDatabase, Server, new_id, postgres_url, reply, require_postgres
from tests.faults import FaultyProxy
from tests.helpers import wait_for
from tests.test_scale_out import messages

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # on PostgreSQL in every run

LEASE_SECONDS = 15  # longer than the 10 s outage a turn must outlive
SHORT_LEASE_SECONDS = 3  # shorter than the outage a turn cannot outlive
OUTAGE_SECONDS = 10


class ProxiedWorker:
    """A worker on a database of its own, reached through a :class:`FaultyProxy`."""

    def __init__(self, tmp, lease_seconds: float):
        self.pg = PostgresDatabase(postgres_url())
        parts = urlsplit(self.pg.url)
        self.proxy = FaultyProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.proxy.port}" if credentials else f"127.0.0.1:{self.proxy.port}"
        self.server = Server(tmp, urlunsplit(parts._replace(netloc=netloc)),
                             {"OMNI_LEASE_SECONDS": str(lease_seconds)})

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        try:
            self.proxy.restore()
            self.server.stop()
        finally:
            self.proxy.close()
            self.pg.drop()


def running(tmp_path_factory, name: str, lease_seconds: float):
    require_postgres("database outage tests")
    worker = ProxiedWorker(tmp_path_factory.mktemp(name), lease_seconds)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    yield from running(tmp_path_factory, "db-outage", LEASE_SECONDS)


def database_now(pg: PostgresDatabase):
    with pg.psycopg.connect(pg.admin_url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute("SELECT now()").fetchone()[0]


def last_query_at(pg: PostgresDatabase):
    """When the latest query of a connection to ``pg``'s database began."""
    with pg.psycopg.connect(pg.admin_url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute("SELECT max(query_start) FROM pg_stat_activity WHERE datname = %s "
                            "AND pid <> pg_backend_pid()", (pg.name,)).fetchone()[0]


def restart_found_by_other_work(worker: ProxiedWorker) -> None:
    """A PostgreSQL restart as a busy worker meets it: its other work uses
    the connection between turns (here the sweep of tool approvals, every
    2 s), once before the restart and once after it, meeting the broken
    connection before the next turn does."""
    server = worker.server
    since = database_now(worker.pg)
    wait_for(lambda: (last_query_at(worker.pg) or since) > since, timeout=10,
             message="a query of the worker's after the turn")
    sweeps_failed = server.log().count("approvals: a sweep failed")
    worker.proxy.cut()  # every connection of the worker is gone; the database is back at once
    wait_for(lambda: server.log().count("approvals: a sweep failed") > sweeps_failed, timeout=10,
             message="the worker's sweep after the restart")


def test_the_first_turn_after_a_database_restart_is_saved(worker):
    server, resource, thread = worker.server, new_id("restart"), new_id("t")
    server.chat("Before the restart", resource, thread).assert_ok()
    restart_found_by_other_work(worker)
    second = server.chat("After the restart", resource, thread)
    second.assert_ok()
    assert second.text == reply("After the restart", "Before the restart")
    assert messages(server, thread, resource) == [
        ("user", "Before the restart"), ("assistant", reply("Before the restart")),
        ("user", "After the restart"), ("assistant", second.text),
    ]
    # a new thread's first turn (its mapping created mid-turn) too
    restart_found_by_other_work(worker)
    other = new_id("t")
    server.chat("A new thread after a restart", resource, other).assert_ok()
    assert messages(server, other, resource) == [
        ("user", "A new thread after a restart"), ("assistant", reply("A new thread after a restart"))]


def test_a_turn_that_streams_through_a_short_outage_is_saved_once_the_database_is_back(worker):
    server, resource, thread = worker.server, new_id("outage"), new_id("t")
    server.chat("Before the outage", resource, thread).assert_ok()
    with server.open_sse("/api/chat", {"message": "During the outage [slow]", "resourceId": resource,
                                       "threadId": thread}) as stream:
        assert stream.status == 200 and stream.is_stream
        stream.read_until("text")
        worker.proxy.refuse(OUTAGE_SECONDS)  # the rest of the reply streams with no database
        result = stream.result()
    result.assert_ok()
    assert not worker.proxy.refusing, "the turn ended before the database was back"
    assert messages(server, thread, resource) == [
        ("user", "Before the outage"), ("assistant", reply("Before the outage")),
        ("user", "During the outage [slow]"), ("assistant", result.text),
    ]
    # and the next turn's model call carries it
    after = server.chat("After the outage", resource, thread)
    after.assert_ok()
    assert after.text == reply("After the outage", "Before the outage", "During the outage [slow]")


@pytest.fixture(scope="module")
def short_lease_worker(tmp_path_factory):
    yield from running(tmp_path_factory, "db-outage-short-lease", SHORT_LEASE_SECONDS)


def test_a_turn_whose_outage_outlives_its_lease_says_so_and_leaves_the_thread_resumable(
        short_lease_worker):
    worker = short_lease_worker
    server, resource, thread = worker.server, new_id("long-outage"), new_id("t")
    server.chat("Before the outage", resource, thread).assert_ok()
    with server.open_sse("/api/chat", {"message": "Lost to the outage [slow]", "resourceId": resource,
                                       "threadId": thread}) as stream:
        assert stream.status == 200 and stream.is_stream
        stream.read_until("text")
        worker.proxy.refuse(3 * SHORT_LEASE_SECONDS)
        result = stream.result()
    last = result.last
    assert last["type"] == "error" and last["code"] == "unavailable", result.describe()
    assert "not saved" in last["message"] and last.get("retryAfter", 0) >= 1, last
    wait_for(lambda: not worker.proxy.refusing, timeout=4 * SHORT_LEASE_SECONDS)
    # The thread goes on: its mapping and transcript as stored, its lease not held.
    after = wait_for(lambda: (r := server.chat("After the outage", resource, thread)).status == 200 and r,
                     timeout=2 * SHORT_LEASE_SECONDS + 10)
    after.assert_ok()
    assert after.session_id == server.chat("Once more", resource, thread).assert_ok().session_id
    assert messages(server, thread, resource)[:2] == [
        ("user", "Before the outage"), ("assistant", reply("Before the outage"))]
    assert after.text.startswith('Offline model heard: "After the outage". Earlier questions: '
                                 '"Before the outage"'), after.text
