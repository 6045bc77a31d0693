"""Warm Claude processes against live daphne servers, with the defaults
(warm clients on): the same CLI answers a follow-up over any transport, a
turn taken on another server sharing the database makes the warm client
stale, the process budget refuses with ``server_busy`` and recovers, and a
stopped server leaves no CLI behind (``Server.stop`` checks)."""

from __future__ import annotations


import pytest

from tests.e2e import Server, WSClient, new_id, reply, run_database, serving, store_enabled

pytestmark = [
    pytest.mark.engine_agnostic,  # runs once: see pytest.ini
    pytest.mark.e2e,
    pytest.mark.skipif(not store_enabled(), reason="needs the transcript store (OMNI_SESSION_STORE)"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Servers A (with a spare) and B on one database, a working directory each."""
    tmp = tmp_path_factory.mktemp("pool-pair")
    pg = run_database()
    database_url = pg.url if pg else f"file:{tmp / 'shared.db'}"
    a = Server(tmp / "a", database_url, {"OMNI_SPARE_CLIENTS": "1"})
    b = Server(tmp / "b", database_url)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        try:
            try:
                a.stop()  # fails if a warm client or spare outlives daphne
            finally:
                b.stop()
        finally:
            if pg:
                pg.drop()


async def test_a_follow_up_reuses_the_cli_whatever_the_transport(pair):
    a, _ = pair
    resource, thread = new_id("user"), new_id("thread")
    first = a.chat("What is 2+2?", resource, thread).assert_ok()
    before = set(a.cli_children())
    async with await WSClient.connect(a) as ws:
        second = await ws.turn({"type": "message", "message": "What was my last question?",
                                "threadId": thread, "resourceId": resource})
    assert second.last["type"] == "done", second.describe()
    assert second.session_id == first.session_id and second.session["resumed"] is True
    assert second.text == reply("What was my last question?", "What is 2+2?")
    line = a.wait_log(rf"\[POOL\] Reusing warm client thread={thread} ")
    assert int(line.rsplit("pid=", 1)[1]) in before, "the follow-up ran on another CLI"


def test_a_turn_on_another_server_makes_the_warm_client_stale(pair):
    a, b = pair
    resource, thread = new_id("user"), new_id("thread")
    a.chat("first on A", resource, thread).assert_ok()
    b.chat("then on B", resource, thread).assert_ok()
    again = a.chat("back on A", resource, thread).assert_ok()
    assert again.text == reply("back on A", "first on A", "then on B"), again.text
    assert a.wait_log(rf"\[POOL\] Closing client thread={thread} .*: stale")


def test_a_new_thread_is_answered_by_a_spare(pair):
    a, _ = pair
    a.wait_log(r"\[POOL\] Spare client ready agent=smart", timeout=30)
    thread = new_id("thread")
    a.chat("hello spare", new_id("user"), thread).assert_ok()
    assert a.wait_log(rf"\[POOL\] Using spare client agent=smart thread={thread} ")


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A server whose budget is one process."""
    yield from serving(tmp_path_factory, extra_env={"OMNI_MAX_PROCESSES": "1"})


async def test_a_full_budget_answers_server_busy_on_both_transports_and_recovers(tight):
    resource = new_id("user")
    with tight.open_sse("/api/chat", {"message": "[slow] taking the only process",
                                      "threadId": new_id("thread"), "resourceId": resource}) as busy:
        busy.read_until("text")
        refused = tight.chat("me too", new_id("user"), new_id("thread"))
        assert refused.status == 503, refused.describe()
        assert refused.body["error"]["code"] == "server_busy"
        assert int(refused.headers["retry-after"]) >= 1
        async with await WSClient.connect(tight) as ws:
            event = (await ws.turn({"type": "message", "message": "and me",
                                    "threadId": new_id("thread"), "resourceId": resource})).last
        assert event["type"] == "error" and event["code"] == "server_busy" and event["retryAfter"] >= 1
        assert busy.result().last["type"] == "done"
    # the finished turn's warm client is idle now: evicted for the next turn
    after = tight.chat("my turn now", new_id("user"), new_id("thread")).assert_ok()
    assert after.last["type"] == "done"
    assert tight.wait_log(r"\[POOL\] Closing client thread=.*: budget")
