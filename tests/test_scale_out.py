"""Two live daphne workers behind no balancer, as one service: one fresh
PostgreSQL database and one Redis (a key prefix of this module's own), each
worker with a data dir, ``CLAUDE_CONFIG_DIR`` and working directory of its
own. Turns move between them, one turn per thread holds across them, streams
and interrupts reach a turn from the other worker, a killed worker frees its
threads within the lease.

PostgreSQL: ``TEST_POSTGRES_URL`` (default ``postgres://postgres@127.0.0.1:5432/omni``,
or the run's own ``DATABASE_URL`` when it is PostgreSQL); Redis: ``TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``). Without them the module is skipped,
except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.conftest import ci
from tests.e2e import (
    PostgresDatabase, Server, ServerPair, WSClient, descendants, is_cli, new_id, postgres_url, reply,
)
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # on PostgreSQL in every run

LEASE_SECONDS = 3  # short, so a killed worker's thread frees quickly


def redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_services() -> None:
    """PostgreSQL and Redis must answer: skip without them, fail under CI."""
    problems = []
    try:
        import psycopg

        admin = postgres_url().rsplit("/", 1)[0] + "/postgres"
        psycopg.connect(admin, connect_timeout=3).close()
    except Exception as exc:
        problems.append(f"PostgreSQL at {postgres_url()}: {exc}")
    try:
        import redis

        redis.Redis.from_url(redis_url(), socket_connect_timeout=3).ping()
    except Exception as exc:
        problems.append(f"Redis at {redis_url()}: {exc}")
    if problems:
        message = "scale-out tests need PostgreSQL and Redis: " + "; ".join(problems)
        if ci():
            pytest.fail(message)
        pytest.skip(message)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Worker(Server):
    def __init__(self, data_dir: Path, database_url: str, extra_env: dict[str, str]):
        super().__init__(data_dir, database_url)
        self.extra_env = extra_env

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("OMNI_WORKSPACE_DIR", None)
        env.update(self.extra_env)
        return env

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (a machine dying)."""
        proc, self.proc = self.proc, None
        self.seen_cli.update(p for p in descendants(proc.pid) if is_cli(p))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Cluster(ServerPair):
    def __init__(self, tmp: Path):
        self.pg = PostgresDatabase(postgres_url(), migrated=True)
        self.prefix = f"omni-test-{uuid.uuid4().hex[:8]}"
        self.env = {"REDIS_URL": redis_url(), "OMNI_REDIS_PREFIX": self.prefix,
                    "OMNI_LEASE_SECONDS": str(LEASE_SECONDS), "OMNI_SHUTDOWN_GRACE_SECONDS": "8"}
        self.tmp = tmp
        self.a = Worker(tmp / "worker-a", self.pg.url, self.env)
        self.b = Worker(tmp / "worker-b", self.pg.url, self.env)

    def cleanup(self) -> None:
        """The workers' keys in Redis."""
        delete_redis_keys(self.prefix)


def delete_redis_keys(prefix: str) -> None:
    """Every key in Redis under a test's ``OMNI_REDIS_PREFIX``."""
    import redis

    client = redis.Redis.from_url(redis_url(), socket_connect_timeout=3)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


def running_cluster(tmp_path_factory, name: str):
    """A module fixture's body: the services required, a cluster started in
    a fresh folder ``name``, stopped after the module."""
    require_services()
    cluster = Cluster(tmp_path_factory.mktemp(name))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, "scale-out")


def messages(server: Server, thread: str, resource: str) -> list[tuple[str, str]]:
    status, data = server.get_json("/api/sessions/messages", threadId=thread, resourceId=resource)
    assert status == 200, data
    return [(m["role"], m["text"]) for m in data["messages"]]


def start_slow_turn(server: Server, resource: str, thread: str, message: str = "Count slowly [slow]"):
    """An SSE turn on ``server`` read up to its first text (mid-turn)."""
    stream = server.open_sse("/api/chat", {"message": message, "resourceId": resource,
                                           "threadId": thread})
    assert stream.status == 200 and stream.is_stream
    stream.read_until("text")
    return stream


def stream_path(thread: str, resource: str) -> str:
    return "/api/chat/stream?" + urlencode({"threadId": thread, "resourceId": resource})


# --- tests ---------------------------------------------------------------------------

def test_both_workers_are_healthy(cluster):
    for worker in (cluster.a, cluster.b):
        status, _, data = worker.request("GET", "/api/health")
        assert status == 200, data
        assert data["status"] == "ok"
        assert data["checks"] == {"database": "ok", "channelLayer": "ok", "turns": "ok"}
        assert data["processes"]["running"] == 0


def test_a_conversation_moves_between_workers(cluster):
    resource, thread = new_id("user"), new_id("thread")
    one = cluster.a.chat("What is 2+2?", resource, thread).assert_ok()
    two = cluster.b.chat("What was my last question?", resource, thread).assert_ok()
    assert two.session["resumed"] is True and two.session_id == one.session_id
    assert two.text == reply("What was my last question?", "What is 2+2?")
    # back on A: A answers with B's turn in its context, not from what it saw itself
    three = cluster.a.chat("And before that?", resource, thread).assert_ok()
    assert three.text == reply("And before that?", "What is 2+2?", "What was my last question?")
    assert messages(cluster.b, thread, resource) == [
        ("user", "What is 2+2?"), ("assistant", one.text),
        ("user", "What was my last question?"), ("assistant", two.text),
        ("user", "And before that?"), ("assistant", three.text),
    ]


def test_a_fork_on_b_of_a_thread_started_on_a(cluster):
    resource, parent, child = new_id("user"), new_id("thread"), new_id("fork")
    cluster.a.chat("What is 2+2?", resource, parent).assert_ok()
    fork = cluster.b.fork("Now multiply", resource, parent, child).assert_ok()
    assert fork.session["forkedFromThreadId"] == parent
    assert fork.text == reply("Now multiply", "What is 2+2?")
    # the branches are independent: the parent goes on without the fork's turn
    again = cluster.a.chat("And the parent?", resource, parent).assert_ok()
    assert again.text == reply("And the parent?", "What is 2+2?")


def test_two_simultaneous_turns_on_one_thread_one_done_one_busy(cluster):
    resource, thread = new_id("user"), new_id("thread")
    opening = cluster.a.chat("Opening message", resource, thread).assert_ok()
    results = {}
    barrier = threading.Barrier(2)

    def send(worker, name):
        barrier.wait()
        results[name] = worker.chat(f"from {name} [slow]", resource, thread)

    threads = [threading.Thread(target=send, args=(w, n)) for w, n in ((cluster.a, "A"), (cluster.b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    statuses = sorted((r.status, n) for n, r in results.items())
    assert [s for s, _ in statuses] == [200, 409], {n: r.describe() for n, r in results.items()}
    winner = next(n for n, r in results.items() if r.status == 200)
    loser = next(n for n, r in results.items() if r.status == 409)
    results[winner].assert_ok()
    assert results[loser].body["error"]["code"] == "thread_busy"
    won = results[winner]
    assert won.text == reply(f"from {winner} [slow]", "Opening message")
    # the transcript holds the opening and exactly the successful turn
    assert messages(cluster.a, thread, resource) == [
        ("user", "Opening message"), ("assistant", opening.text),
        ("user", f"from {winner} [slow]"), ("assistant", won.text),
    ]


async def test_a_follower_on_the_other_worker_gets_the_whole_answer(cluster):
    resource, thread = new_id("user"), new_id("thread")
    stream = await asyncio.to_thread(start_slow_turn, cluster.a, resource, thread)
    async with await WSClient.connect(cluster.b) as ws:
        await ws.send({"type": "follow", "threadId": thread, "resourceId": resource})
        followed = await ws.recv_until("done", "error")
    own = (await asyncio.to_thread(stream.result)).assert_ok()
    stream.close()
    assert followed == own.events
    assert [e["seq"] for e in followed] == list(range(len(followed)))


def test_an_sse_client_reconnecting_with_last_event_id_misses_nothing(cluster):
    resource, thread = new_id("user"), new_id("thread")
    owner = start_slow_turn(cluster.a, resource, thread)
    path = stream_path(thread, resource)
    first = cluster.b.open_sse(path, None)
    assert first.status == 200 and first.is_stream
    for _ in range(8):
        first.next_event()
    first.close()  # the connection drops mid-turn
    seen = list(first.events)
    assert first.ids == [f"{e['turnId']}:{e['seq']}" for e in seen]
    # reconnect, this time to the worker that runs the turn, and then to B again
    second = cluster.a.open_sse(path, None, headers={"Last-Event-ID": first.ids[-1]})
    for _ in range(5):
        second.next_event()
    second.close()
    seen += second.events
    third = cluster.b.open_sse(path, None, headers={"Last-Event-ID": second.ids[-1]})
    rest = third.result()
    third.close()
    seen += rest.events
    whole = owner.result().assert_ok()
    owner.close()
    assert seen == whole.events  # nothing missed, nothing twice
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    # no turn runs any more: 404 on both workers
    for worker in (cluster.a, cluster.b):
        status, _, data = worker.request("GET", path)
        assert status == 404 and data["error"]["code"] == "not_found"


async def test_an_interrupt_on_the_other_worker_stops_the_turn(cluster):
    resource, thread = new_id("user"), new_id("thread")
    stream = await asyncio.to_thread(start_slow_turn, cluster.a, resource, thread)
    started = time.monotonic()
    async with await WSClient.connect(cluster.b) as ws:
        await ws.send({"type": "interrupt", "threadId": thread, "resourceId": resource})
        result = await asyncio.to_thread(stream.result)
    stream.close()
    assert time.monotonic() - started < 2.5  # the slow reply alone takes 3 s; expected under 0.8 s
    assert result.last["type"] == "done" and result.last["result"]["isError"] is True


def test_health_is_503_when_redis_is_unreachable(cluster):
    env = {**cluster.env, "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    worker = Worker(cluster.tmp / "worker-c", cluster.pg.url, env)
    worker.start()
    try:
        started = time.monotonic()
        status, headers, data = worker.request("GET", "/api/health")
        assert time.monotonic() - started < 3  # expected at most health.CHECK_SECONDS (1 s)
        assert status == 503, data
        assert data["status"] == "error"
        assert data["checks"] == {"database": "ok", "channelLayer": "error", "turns": "ok"}
        assert "127.0.0.1" not in str(data)  # names the check, reveals nothing
    finally:
        worker.stop()


def cli_settled(worker: Server) -> bool:
    """No turn runs on ``worker`` and no CLI of it is still exiting."""
    status, _, data = worker.request("GET", "/api/health")
    counts = data["processes"]
    return (counts["running"] == 0 and counts["exiting"] == 0
            and len(worker.cli_children()) <= counts["warm"] + counts["spare"])


def warm_count(worker: Server) -> int:
    status, _, data = worker.request("GET", "/api/health")
    assert status == 200, data
    return data["processes"]["warm"]


def test_a_delete_on_b_stops_the_turn_running_on_a_and_closes_as_warm_client(cluster):
    resource, running, idle = new_id("user"), new_id("thread"), new_id("thread")
    cluster.a.chat("Keep me warm", resource, idle).assert_ok()
    cluster.a.chat("First", resource, running).assert_ok()
    warm = warm_count(cluster.a)
    stream = start_slow_turn(cluster.a, resource, running, "Second, slowly [slow]")
    session_id = stream.events[0]["sessionId"]
    started = time.monotonic()
    status, _, _ = cluster.b.request("DELETE", "/api/sessions", {"threadId": running, "resourceId": resource})
    assert status == 200
    ended = stream.result()
    stream.close()
    assert time.monotonic() - started < 2.5  # stopped, not run to its end (3 s); expected under 0.8 s
    assert ended.last["type"] == "error" and ended.last["code"] == "thread_deleted"
    assert ended.last["threadId"] == running
    # A's idle warm client of another thread deleted on B closes too
    status, _, _ = cluster.b.request("DELETE", "/api/sessions", {"threadId": idle, "resourceId": resource})
    assert status == 200
    # neither thread's client is kept (expected well under a second, over Redis)
    wait_for(lambda: warm_count(cluster.a) <= warm - 2, timeout=5, interval=0.1,
             message="A closed the warm clients of the deleted threads")
    # whatever A's CLIs flushed late is erased as well: once they have exited, they flush nothing more
    wait_for(lambda: cli_settled(cluster.a), timeout=30, interval=0.1,
             message="A's CLIs of the deleted threads exited")
    for thread in (running, idle):
        for worker in (cluster.a, cluster.b):
            status, _ = worker.metadata(thread, resource)
            assert status == 404, f"{thread} came back on {worker}"
    import psycopg

    with psycopg.connect(cluster.pg.url) as db:
        lines = db.execute("SELECT count(*) FROM sessions_app_transcriptentry WHERE session_id = %s",
                           [session_id]).fetchone()[0]
        leases = db.execute("SELECT count(*) FROM chat_app_threadlease WHERE thread_id = %s",
                            [running]).fetchone()[0]
    assert (lines, leases) == (0, 0)
    again = cluster.a.chat("Hello again", resource, running).assert_ok()
    assert again.session["resumed"] is False and again.session_id != session_id
    assert again.text == reply("Hello again")


def test_a_tool_call_decided_on_the_other_worker_runs_where_it_waits(cluster):
    """A turn on A waits for approval (no process held); the decision comes
    to B: A's turn goes on, on the same stream; the tool runs once."""
    resource, thread, target = new_id("user"), new_id("thread"), new_id("old")
    cluster.a.chat("an old conversation", resource, target, agent="datadog").assert_ok()
    stream = cluster.a.open_sse("/api/chat", {
        "message": f'Delete it [tool delete_conversation {{"threadId": "{target}"}}]',
        "resourceId": resource, "threadId": thread})
    request = stream.read_until("approval_request")
    busy = cluster.b.chat("meanwhile", resource, thread)
    assert busy.status == 409 and busy.body["error"]["code"] == "thread_busy"
    status, _, decided = cluster.b.request("POST", "/api/chat/approval", {
        "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"], "decision": "allow"})
    assert status == 200, decided
    rest = stream.result()
    stream.close()
    kinds = [e["type"] for e in rest.events if e["type"] not in ("chunk", "text")]
    assert kinds == ["session", "tool_use", "approval_request", "approval", "tool_result", "done"], kinds
    assert len({e["turnId"] for e in rest.events}) == 1
    for worker in (cluster.a, cluster.b):
        status, _ = worker.metadata(target, resource)
        assert status == 404
    status, _, again = cluster.a.request("POST", "/api/chat/approval", {
        "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"], "decision": "deny"})
    assert status == 409 and again["error"]["code"] == "already_decided"


def test_a_killed_worker_frees_its_threads(cluster):
    """Last: it kills A (the module's teardown copes with a dead worker). B
    runs on the same host, so it takes A's leases at once; a lease it cannot
    judge (written by a process of another host) it waits out, answering
    thread_busy with Retry-After meanwhile."""
    resource, here, there = new_id("user"), new_id("thread"), new_id("thread")
    stream = start_slow_turn(cluster.a, resource, here)
    other = start_slow_turn(cluster.a, resource, there)
    session_id = stream.events[0]["sessionId"]
    cluster.a.kill()
    killed = time.monotonic()
    stream.close()
    other.close()
    import psycopg

    with psycopg.connect(cluster.pg.url) as db:  # as if another host had taken it
        db.execute("UPDATE chat_app_threadlease SET host_id = 'another-host' WHERE thread_id = %s",
                   [there])
    # the dead process of this host: at once, no waiting out the lease
    result = cluster.b.chat("Are you there?", resource, here)
    result.assert_ok()
    # the thread goes on with its session: its message was stored before the
    # turn announced it (tests/test_crash.py checks the history and the context)
    assert result.session["resumed"] is True and result.session_id == session_id
    status, meta = cluster.b.metadata(here, resource)
    assert status == 200 and meta["session"]["sessionId"] == result.session_id
    # the other host's lease: busy until it runs out, and thread_busy says how long
    busy = cluster.b.chat("Anyone?", resource, there)
    assert busy.status == 409 and busy.body["error"]["code"] == "thread_busy", busy.describe()
    assert 1 <= int(busy.headers["retry-after"]) <= LEASE_SECONDS
    while True:
        freed = time.monotonic() - killed  # when the attempt that got in was sent
        result = cluster.b.chat("Are you there?", resource, there)
        if result.status != 409:
            break
        # expected LEASE_SECONDS (the dead worker's lease runs out), well before 3x that
        assert freed < 3 * LEASE_SECONDS, "the lease never expired"
        time.sleep(0.2)
    result.assert_ok()
    assert freed < 3 * LEASE_SECONDS
    assert cluster.a.leftover_cli() == []


def test_sigterm_lets_the_running_turn_finish_and_refuses_new_ones(cluster):
    """After the kill: B is the last worker standing, and now it stops."""
    resource, thread = new_id("user"), new_id("thread")
    stream = start_slow_turn(cluster.b, resource, thread)
    proc = cluster.b.proc
    proc.send_signal(signal.SIGTERM)

    def noticed():  # once the worker has noticed the signal (daphne drops the requests in flight at it)
        try:
            answer = cluster.b.request(
                "POST", "/api/chat", {"message": "Still there?", "resourceId": resource}, timeout=2)
        except (ConnectionError, TimeoutError, http.client.HTTPException):
            return None
        return answer if answer[0] == 503 else None

    status, headers, refused = wait_for(noticed, timeout=5, interval=0.1, message="a 503 after SIGTERM")
    assert refused["error"]["code"] == "server_busy"
    assert int(headers["retry-after"]) >= 1
    health_status, _, health = cluster.b.request("GET", "/api/health", timeout=2)
    assert health_status == 503 and health["checks"]["turns"] == "draining", health
    finished = stream.result()
    stream.close()
    finished.assert_ok()  # not interrupted: it ended within the grace period
    assert finished.last["result"]["isError"] is False
    assert finished.text == reply("Count slowly [slow]")
    proc.wait(timeout=15)
    cluster.b.stop()  # already exited: checks that no CLI outlived it
