"""A message for a busy thread (contract §12) across live workers (issue 24):
a thread's queue survives SIGKILL of the worker that held it (the embedded
libSQL file, the one worker started again on the same data dir: its sweep
takes the dead process's lease and runs the queue, in order), and two
workers share one thread's queue over PostgreSQL and Redis (a message
queued on B whose turn runs on A streams on B; a cancel on A ends B's
stream; an interrupt through B stops the turn running on A; A SIGKILLed
mid-turn, B's sweep takes the thread and B's open stream carries the turn).
(In one process: tests/test_queue.py.)
"""

from __future__ import annotations

import re

import pytest

from tests.e2e import SSEStream, Server, new_id, reply
from tests.helpers import wait_for
from tests.test_crash import kill
from tests.test_scale_out import messages, running_cluster, start_slow_turn

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # the embedded file; PostgreSQL + Redis

SLOW = "Tell me slowly [slow]"  # 30 deltas 0.1 s apart: ~3 s of reply
QUIET = 10  # seconds a queued message's stream may stay silent (under the 15 s heartbeat): not a hang


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One worker on the embedded libSQL file (whatever the run's engine)."""
    server = Server(tmp_path_factory.mktemp("queue-embedded"), None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, "queue-cluster")


def send(server: Server, message: str, resource: str, thread: str, if_busy: str) -> SSEStream:
    """A message with ``ifBusy`` for a busy thread: its open stream (a
    read fails after ``QUIET`` seconds of silence rather than wait on)."""
    stream = server.open_sse("/api/chat", {"message": message, "resourceId": resource,
                                           "threadId": thread, "ifBusy": if_busy}, timeout=QUIET)
    assert stream.status == 200 and stream.is_stream, stream.result().describe()
    return stream


def enqueue(server: Server, message: str, resource: str, thread: str) -> tuple[SSEStream, dict]:
    """``ifBusy: "enqueue"``: the stream and its first event, ``queued`` (at once)."""
    stream = send(server, message, resource, thread, "enqueue")
    queued = stream.next_event()
    assert queued["type"] == "queued" and queued["seq"] == 0, stream.events
    assert queued["queueId"].startswith("q-") and queued["threadId"] == thread
    return stream, queued


def queue_of(server: Server, thread: str, resource: str) -> list[tuple[str, str, int]]:
    status, data = server.get_json("/api/chat/queue", threadId=thread, resourceId=resource)
    assert status == 200, data
    return [(q["queueId"], q["message"], q["position"]) for q in data["queued"]]


def started_here(server: Server, queue_id: str) -> bool:
    """This worker (any of its starts) logged the start of ``queue_id``'s turn."""
    return re.search(rf"Starting queued message {queue_id} ", server.all_logs()) is not None


def chat_lines(server: Server) -> str:
    """What the server's log says of turns and queues (not its access lines)."""
    return "\n".join(line for line in server.all_logs().splitlines() if "omni." in line)[-4000:]


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events if e["type"] not in ("text", "chunk")]


def text_of(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text")


# --- SIGKILL ---------------------------------------------------------------------------------

def test_a_queue_survives_sigkill_of_its_worker_and_runs_in_order_after_the_restart(embedded):
    resource, thread = new_id("user"), new_id("thread")
    slow = start_slow_turn(embedded, resource, thread, SLOW)  # streaming its reply
    one, first = enqueue(embedded, "first in line", resource, thread)
    two, second = enqueue(embedded, "second in line", resource, thread)
    assert (first["position"], second["position"]) == (1, 2)
    # GET /api/chat/queue while they wait: both, in order
    assert queue_of(embedded, thread, resource) == [
        (first["queueId"], "first in line", 1), (second["queueId"], "second in line", 2)]

    kill(embedded)  # mid-turn, two messages waiting: nothing on this worker frees the thread
    for stream in (slow, one, two):
        stream.close()
    embedded.start()  # same data dir: its sweep takes the dead process's lease

    # both run, in order, each with the earlier texts in the model's context
    # (the killed turn's message is in the history, without a reply)
    expected = [
        ("user", SLOW),
        ("user", "first in line"), ("assistant", reply("first in line", SLOW)),
        ("user", "second in line"), ("assistant", reply("second in line", SLOW, "first in line")),
    ]
    wait_for(lambda: messages(embedded, thread, resource) == expected, timeout=15,
             message=lambda: f"{messages(embedded, thread, resource)}\n{chat_lines(embedded)}")
    assert queue_of(embedded, thread, resource) == []
    log = embedded.log()  # the restarted worker's
    starts = [log.index(f"Starting queued message {q['queueId']} ") for q in (first, second)]
    assert starts == sorted(starts), chat_lines(embedded)


# --- two workers over PostgreSQL and Redis ------------------------------------------------------

def test_two_workers_share_a_threads_queue(cluster):
    a, b = cluster.a, cluster.b
    resource, thread = new_id("user"), new_id("thread")
    slow = start_slow_turn(a, resource, thread, SLOW)  # running on A, mid-reply

    # queued through B while the turn runs on A: ``queued`` at once
    kept, first = enqueue(b, "first in line", resource, thread)
    doomed, second = enqueue(b, "never mind", resource, thread)
    assert (first["position"], second["position"]) == (1, 2)
    assert [q[1] for q in queue_of(a, thread, resource)] == ["first in line", "never mind"]

    # cancelled on A: B's stream of it ends with ``error`` ``cancelled``
    status, _, data = a.request("DELETE", "/api/chat/queue", {
        "threadId": thread, "resourceId": resource, "queueId": second["queueId"]})
    assert status == 200 and data == {"success": True, "queueId": second["queueId"]}, data
    with doomed:
        gone = doomed.result().events
    assert kinds(gone) == ["queued", "error"] and gone[-1]["code"] == "cancelled", gone
    assert gone[-1]["seq"] == 1 and gone[-1]["turnId"] == second["turnId"]

    # an interrupt through B stops the turn running on A; it runs next, ahead of the queue
    now = send(b, "stop, do this", resource, thread, "interrupt")
    with slow:
        stopped = slow.result().events
    assert stopped[-1]["type"] == "done", kinds(stopped)
    assert text_of(stopped) != reply(SLOW), "the slow turn ran to its end"
    with now:
        interrupting = now.result().events
    assert kinds(interrupting) == ["session", "done"] and interrupting[0]["seq"] == 0, interrupting
    assert text_of(interrupting).startswith(
        'Offline model heard: "stop, do this". Earlier questions: "Tell me slowly [slow]"')

    # the first queued message: its stream on B carries its own turn, session to done
    with kept:
        events = kept.result().events  # the ``queued`` read above, then the rest
    assert kinds(events) == ["queued", "session", "done"], events
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert {e["turnId"] for e in events} == {first["turnId"]}
    assert text_of(events) == reply("first in line", SLOW, "stop, do this")
    # one worker started it: A, which freed the thread (B's sweep only when
    # it found the thread free in the moment between A's end and A's kick)
    ran_on = [w for w in (a, b) if started_here(w, first["queueId"])]
    assert len(ran_on) == 1, (chat_lines(a), chat_lines(b))
    assert queue_of(b, thread, resource) == []
    assert messages(b, thread, resource) == [
        ("user", SLOW), ("assistant", text_of(stopped)),
        ("user", "stop, do this"), ("assistant", text_of(interrupting)),
        ("user", "first in line"), ("assistant", text_of(events)),
    ]


def test_a_worker_killed_mid_turn_leaves_its_queue_to_the_other(cluster):
    """Last in the module: A stays dead (the teardown stops what is left)."""
    a, b = cluster.a, cluster.b
    resource, thread = new_id("user"), new_id("thread")
    slow = start_slow_turn(a, resource, thread, SLOW)
    kept, first = enqueue(b, "first in line", resource, thread)
    # (B's kick right after queueing it found the thread busy by now)
    assert queue_of(b, thread, resource) == [(first["queueId"], "first in line", 1)]
    kill(a)  # its lease is of a dead process of this host: B's sweep takes it
    slow.close()
    # the stream that queued it on B carries the turn that B runs
    with kept:
        events = kept.result().events
    assert kinds(events) == ["queued", "session", "done"], events
    assert {e["turnId"] for e in events} == {first["turnId"]}
    assert text_of(events) == reply("first in line", SLOW)
    assert started_here(b, first["queueId"]) and not started_here(a, first["queueId"])
    assert messages(b, thread, resource) == [
        ("user", SLOW), ("user", "first in line"), ("assistant", text_of(events))]
