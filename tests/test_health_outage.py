"""A database outage on a live daphne server (issue 14, items 6 and 14).

The server reaches PostgreSQL through a TCP proxy of the test's own, which
then black-holes it: connections already open stop getting answers, new
ones are accepted and never answered, as with a database host gone from the
network. Meanwhile a load balancer's worth of health probes must each be
answered (503, ``database: error``) within a couple of seconds without
piling up threads, static files must still be served at once, and a REST
call must be a 503 with ``Retry-After``, never a 500. Once the proxy heals,
health is 200 again.

PostgreSQL: ``TEST_POSTGRES_URL`` (default ``postgres://postgres@127.0.0.1:5432/omni``,
or the run's own ``DATABASE_URL`` when it is PostgreSQL). Without it the module is
skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e import PostgresDatabase, Server, postgres_url, require_postgres
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # on PostgreSQL in every run

PROBES = 40  # health requests, fired over PROBE_SECONDS
PROBE_SECONDS = 4.0


class BlackHoleProxy:
    """A TCP proxy to ``target`` that can black-hole: while it does, open
    connections' bytes are read and held back, and new connections are
    accepted and never answered (nor read). Healing forwards again (held
    bytes first) and closes the connections accepted meanwhile."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.sockets.append(client)
                if not self.flowing.is_set():
                    self.held.append(client)  # accepted, never answered
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()  # black-holed: held back
                if self.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def black_hole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.close()


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def settled_threads(pid: int) -> int:
    """``threads_of(pid)`` once it has not changed for half a second."""
    seen: list[int] = []

    def steady():
        seen.append(threads_of(pid))
        return len(seen) >= 6 and len(set(seen[-6:])) == 1 and seen[-1]

    return wait_for(steady, timeout=15, interval=0.1, message=lambda: f"a steady thread count: {seen[-10:]}")


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """(server, proxy): a daphne server whose PostgreSQL database (its own) is behind the proxy."""
    require_postgres("database outage tests")
    pg = PostgresDatabase(postgres_url())
    parts = urlsplit(pg.url)
    proxy = BlackHoleProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}"
                                              f"{':' + parts.password if parts.password else ''}"
                                              f"@127.0.0.1:{proxy.port}"))
    server = Server(tmp_path_factory.mktemp("outage"), proxied)
    try:
        server.start()
        yield server, proxy
    finally:
        try:
            proxy.heal()
            server.stop()
        finally:
            proxy.close()
            pg.drop()


def timed(server: Server, method: str, path: str, timeout: float = 30) -> tuple[float, int, dict, object]:
    started = time.monotonic()
    status, headers, body = server.request(method, path, timeout=timeout)
    return time.monotonic() - started, status, headers, body


def test_a_black_holed_database_is_reported_promptly_with_bounded_threads(outage):
    server, proxy = outage
    pid = server.proc.pid
    _, status, _, body = timed(server, "GET", "/api/health")
    assert status == 200 and body["checks"]["database"] == "ok", body
    assert timed(server, "GET", "/api/sessions?resourceId=alice")[1] == 200
    # Static files are served from the default executor: bring it to its full
    # size first, so that the threads counted below are the outage's own.
    with ThreadPoolExecutor(16) as pool:
        assert {r[1] for r in pool.map(lambda _: timed(server, "GET", "/static/chat/chat.css"),
                                       range(64))} == {200}
    threads_before = settled_threads(pid)  # the requests' own threads ended

    proxy.black_hole()
    outage_started = time.monotonic()
    time.sleep(1.2)  # the behaviour under test: the last good result (reused for up to a second) is stale now
    most_threads, most_excess = threads_before, 0
    static_times: list[float] = []
    with ThreadPoolExecutor(PROBES + 2) as pool:
        rest = pool.submit(timed, server, "GET", "/api/sessions?resourceId=alice")
        probes = []
        fired = time.monotonic()
        while len(probes) < PROBES or not all(p.done() for p in probes):
            if len(probes) < PROBES and time.monotonic() >= fired + len(probes) * PROBE_SECONDS / PROBES:
                probes.append(pool.submit(timed, server, "GET", "/api/health"))
                continue
            # a static file meanwhile: served at once, the outage notwithstanding
            try:
                took, status, _, _ = timed(server, "GET", "/static/chat/chat.css", timeout=5)
            except TimeoutError:
                pytest.fail("a static file stalled during the database outage")
            assert status == 200
            static_times.append(took)
            # Django gives each request in flight a thread of its own until it
            # ends; beyond those, the probe's one and a little slack.
            in_flight = sum(not p.done() for p in [*probes, rest])
            threads = threads_of(pid)
            most_threads = max(most_threads, threads)
            most_excess = max(most_excess, threads - threads_before - in_flight)
            time.sleep(0.02)  # pacing of the static files sampled during the outage
        answers = [p.result() for p in probes]
        rest_took, rest_status, rest_headers, rest_body = rest.result()

    for took, status, _, body in answers:
        assert status == 503, body
        assert body["status"] == "error" and body["checks"]["database"] == "error", body
        assert set(body) == {"status", "checks", "processes"}
        assert took < 3.5, [a[0] for a in answers]  # expected health.CHECK_SECONDS (1 s)
    # Threads: the requests' own, the one probe in flight; not one parked per probe.
    print(f"threads: {threads_before} before, at most {most_threads} during the outage,"
          f" at most {most_excess} beyond the requests in flight")
    # 40 probes: one thread parked per probe would be ~40 beyond; the bound
    # leaves room for the executors' idle threads on a busy 2-core machine
    # (it was 6, and a clean CI run once saw 8).
    assert most_excess <= 12, (threads_before, most_threads, most_excess)
    assert static_times and max(static_times) < 0.5, static_times  # expected ~20 ms

    # A REST call that needs the database: 503 with Retry-After, never a 500.
    assert rest_status == 503, rest_body
    assert rest_body == {"error": {"code": "unavailable", "message": rest_body["error"]["message"]}}
    assert int(rest_headers["retry-after"]) >= 1
    assert rest_took < 10, rest_took  # expected PostgreSQL's connect timeout (3 s), not ~2 minutes
    assert time.monotonic() - outage_started < 20  # expected ~6.5 s: 1.2 + PROBE_SECONDS + a check

    proxy.heal()
    healthy = wait_for(lambda: (answer := timed(server, "GET", "/api/health"))[1] == 200 and answer,
                       timeout=8, interval=0.2, message="/api/health is 200 again")  # expected ~2 s
    assert healthy[3]["checks"]["database"] == "ok"
    assert timed(server, "GET", "/api/sessions?resourceId=alice")[1] == 200
    wait_for(lambda: threads_of(pid) <= threads_before + 1, timeout=10,
             message=lambda: ("threads left behind by the outage", threads_before, most_threads, threads_of(pid)))
