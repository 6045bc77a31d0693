"""Scale-out: two daphne workers against one, in the same run.

Starts live workers (``tests/e2e.py``'s ``Server``: ``manage.py migrate``,
then daphne, the offline model, a data dir of its own) on a fresh PostgreSQL
database and Redis, and drives ``CONVERSATIONS`` conversations of
``TURNS`` turns each through one client pool of ``CLIENTS`` threads over SSE:

* one worker: every turn to it;
* two workers: a conversation's turns alternate between them (each turn
  resumes on the other worker: the worst case for warm processes, the
  normal case without sticky routing).

Reports turns per second (wall clock) and the p95 time to the first
``text`` event, for both. ``python -m bench scale``, or
``python -c "import bench.scale as s; print(s.run())"``.

Needs PostgreSQL (``DATABASE_URL`` if it is ``postgres://``, else
``TEST_POSTGRES_URL``, default ``postgres://postgres@127.0.0.1:5432/omni``) and
Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``; keys under a
prefix of the run's own, deleted after).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONVERSATIONS = int(os.environ.get("BENCH_SCALE_CONVERSATIONS", "32"))
TURNS = int(os.environ.get("BENCH_SCALE_TURNS", "2"))
CLIENTS = int(os.environ.get("BENCH_SCALE_CLIENTS", "8"))


def _redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _turn(server, resource: str, thread: str, message: str) -> float:
    """One SSE turn; seconds to its first text event."""
    started = time.perf_counter()
    first = None
    with server.open_sse("/api/chat", {"message": message, "resourceId": resource,
                                       "threadId": thread}) as stream:
        if stream.status != 200:
            raise RuntimeError(f"turn refused: HTTP {stream.status}")
        while (event := stream.next_event()) is not None:
            if event["type"] == "text" and first is None:
                first = time.perf_counter() - started
            if event["type"] == "error":
                raise RuntimeError(f"turn failed: {event}")
    if first is None:
        raise RuntimeError("a turn without text")
    return first


def _drive(workers: list) -> tuple[float, list[float]]:
    """Every conversation's turns, conversations in parallel (``CLIENTS``
    at a time); (wall seconds, time to first text of every turn)."""
    run = uuid.uuid4().hex[:6]

    def conversation(index: int) -> list[float]:
        # a user per conversation (one user's concurrent turns are limited)
        resource, thread = f"bench-{run}-{index}", f"c{index}-{run}"
        return [_turn(workers[(index + turn) % len(workers)], resource, thread,
                      f"Question {turn} of conversation {index}") for turn in range(TURNS)]

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        firsts = [t for turns in pool.map(conversation, range(CONVERSATIONS)) for t in turns]
    return time.perf_counter() - started, firsts


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _measure(tmp: Path) -> list[tuple[str, float, str]]:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import redis

    from tests.e2e import PostgresDatabase, Server, postgres_url

    prefix = f"omni-bench-{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": _redis_url(), "OMNI_REDIS_PREFIX": prefix}
    rows = []
    pg = PostgresDatabase(postgres_url())
    workers = [Server(tmp / "a", pg.url, env), Server(tmp / "b", pg.url, env)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:  # warm-up: imports, the first CLI start, database caches
            _turn(worker, "bench-warm-up", f"w-{uuid.uuid4().hex[:6]}", "Hello")
        for label, pool in (("one worker", workers[:1]), ("two workers", workers)):
            wall, firsts = _drive(pool)
            turns = len(firsts)
            rows += [
                (f"{label}: turns/s ({CONVERSATIONS} conversations x {TURNS}, {CLIENTS} clients)",
                 turns / wall, "turns/s"),
                (f"{label}: p95 time to first text", _p95(firsts) * 1000, "ms"),
                (f"{label}: median time to first text", statistics.median(firsts) * 1000, "ms"),
            ]
    finally:
        try:
            for worker in workers:
                worker.stop(timeout=30)
        finally:
            pg.drop()
            client = redis.Redis.from_url(_redis_url())
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
    return rows


def run() -> list[tuple[str, float, str]]:
    with tempfile.TemporaryDirectory(prefix="omni-bench-scale-") as tmp:
        return _measure(Path(tmp))


if __name__ == "__main__":
    for name, value, unit in run():
        print(f"{name:<70} {value:>10.1f} {unit}")
