"""Warm Claude processes (chat_app.pool), in this process: the real SDK and
CLI against the offline model. Each test reads which CLI process answered
a turn from the pool itself and from /proc."""

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest
from django.db.models import F

from chat_app.pool import client_pid, pool
from chat_app import lifecycle
from chat_app.turns import registry, start_turn
from sessions_app import selectors, services
from sessions_app.errors import RateLimited, ServerBusy
from sessions_app.models import SessionMapping
from tests.helpers import cli_processes, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk, pytest.mark.engine_agnostic]


body = turn_bodies("wes", "warm-1")


async def turn(message, thread="warm-1", **extra):
    """Run a turn; (events, pid of the CLI that answered it)."""
    started = await start_turn(None, body(message, thread, **extra))
    pid = None
    events = []
    async for event in started.listen():
        if pid is None and started._client is not None:
            pid = client_pid(started._client)
        events.append(event)
    return events, pid


def text(events):
    return "".join(e["text"] for e in events if e["type"] == "text")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def gone(pid, timeout=10.0):
    """Wait until process ``pid`` has exited (fails the test if it has not within ``timeout``)."""
    return await wait_for_async(lambda: not alive(pid), timeout=timeout, message=f"process {pid} exited")


def idle_pid(thread="warm-1"):
    client = pool.idle.get(("wes", thread))
    return client.pid if client else None


async def test_a_follow_up_is_answered_by_the_same_cli_process(warm):
    first, pid = await turn("What is 2+2?")
    assert first[-1]["type"] == "done" and idle_pid() == pid and alive(pid)
    second, pid2 = await turn("What was my last question?")
    assert pid2 == pid, "the follow-up spawned a new CLI"
    assert second[0]["resumed"] is True and second[-1]["type"] == "done"
    assert text(second) == ('Offline model heard: "What was my last question?". '
                            'Earlier questions: "What is 2+2?".')
    assert pool.counts() == {"running": 0, "warm": 1, "spare": 0, "exiting": 0, "budget": 4}
    mapping = await selectors.get_metadata("warm-1", "wes")
    assert mapping.message_count == 4 and mapping.session_id == second[0]["sessionId"]


async def test_reuse_evictions_and_refusals_are_logged(warm, caplog):
    caplog.set_level("INFO", logger="omni.pool")
    import logging

    logging.getLogger("omni").addHandler(caplog.handler)
    try:
        await turn("one")
        await turn("two")
        assert "[POOL] Reusing warm client thread=warm-1" in caplog.text
        await services.delete_session("warm-1", "wes")
        await wait_for_async(lambda: "[POOL] Closing client thread=warm-1" in caplog.text, timeout=10)
        assert "[POOL] Closing client thread=warm-1" in caplog.text and "deleted" in caplog.text
    finally:
        logging.getLogger("omni").removeHandler(caplog.handler)


async def test_least_recently_used_is_evicted_and_resumes_cold(warm, chat_log):
    warm.OMNI_WARM_CLIENTS = 1
    _, pid_a = await turn("first for A", thread="lru-a")
    _, pid_b = await turn("first for B", thread="lru-b")
    assert list(pool.idle) == [("wes", "lru-b")]
    assert await gone(pid_a), "the evicted client's CLI still runs"
    events, pid = await turn("second for A", thread="lru-a")
    assert pid not in (pid_a, pid_b)
    assert f"[CHAT] Resuming session: {events[0]['sessionId']}" in chat_log.text
    assert text(events).endswith('Earlier questions: "first for A".')


async def test_an_idle_client_is_closed_after_the_idle_timeout(warm):
    warm.OMNI_WARM_IDLE_SECONDS = 0.3
    _, pid = await turn("hello")
    assert alive(pid)
    assert await gone(pid, timeout=5), "the idle client outlived its timeout"
    assert pool.counts()["warm"] == 0


async def test_a_turn_taken_elsewhere_makes_the_warm_client_stale(warm, chat_log):
    """Another server process took a turn (the mapping's version moved on):
    this process must not answer from its warm client's outdated context."""
    _, pid = await turn("Remember the colour blue")
    await SessionMapping.objects.filter(thread_id="warm-1").aupdate(version=F("version") + 1)
    events, pid2 = await turn("What colour?")
    assert pid2 != pid and await gone(pid)
    assert f"[CHAT] Resuming session: {events[0]['sessionId']}" in chat_log.text
    assert text(events).endswith('Earlier questions: "Remember the colour blue".')


async def test_a_warm_client_whose_cli_died_is_replaced_by_a_cold_resume(warm):
    _, pid = await turn("Remember the number 7")
    os.kill(pid, signal.SIGKILL)
    assert await gone(pid)
    events, pid2 = await turn("Which number?")
    assert pid2 != pid and events[-1]["type"] == "done" and events[0]["resumed"] is True
    assert text(events).endswith('Earlier questions: "Remember the number 7".')


async def test_deleting_a_thread_leaves_no_process_holding_it(warm):
    _, pid = await turn("secret plans")
    await services.delete_session("warm-1", "wes")
    assert await gone(pid) and pool.counts()["warm"] == 0
    events, _ = await turn("Do you know my plans?")  # a new conversation
    assert events[0]["resumed"] is False
    assert text(events).endswith("Earlier questions: none.")


async def test_an_agent_change_drops_the_client(warm):
    _, pid = await turn("hi")
    events, pid2 = await turn("hi again", agent="datadog")
    assert pid2 != pid and await gone(pid)
    assert events[-1]["type"] == "done"
    assert pool.idle[("wes", "warm-1")].agent == "datadog"


async def test_a_fork_never_uses_its_parents_client(warm):
    _, parent_pid = await turn("parent question", thread="fork-parent")
    started = await start_turn(None, SimpleNamespace(
        message="child question", forkFromThreadId="fork-parent", threadId="fork-child",
        resourceId="wes", agent=None, atMessageUuid=None), fork=True)
    events = [e async for e in started.listen()]
    assert events[-1]["type"] == "done"
    assert idle_pid("fork-parent") == parent_pid  # the parent's client is untouched
    assert idle_pid("fork-child") not in (None, parent_pid)
    assert text(events).endswith('Earlier questions: "parent question".')


async def test_interrupt_then_continue_on_the_same_thread(warm):
    started = await start_turn(None, body("tell a long story [slow]"))
    async for event in started.listen():
        if event["type"] == "text":
            await started.interrupt()
            break
    events = [e async for e in started.listen()]
    assert events[-1]["type"] in ("done", "error")
    follow_up, _ = await turn("Are you still there?")
    assert follow_up[-1]["type"] == "done"
    assert 'Earlier questions: "tell a long story [slow]"' in text(follow_up)


async def test_a_client_is_recycled_after_its_turn_limit(warm):
    warm.OMNI_WARM_MAX_TURNS = 2
    _, pid1 = await turn("one")
    _, pid2 = await turn("two")
    assert pid2 == pid1 and await gone(pid1), "recycled after its second turn"
    events, pid3 = await turn("three")
    assert pid3 != pid1 and text(events).endswith('Earlier questions: "one" | "two".')


async def test_a_silent_cli_ends_the_turn_and_the_thread_stays_usable(warm):
    started = await start_turn(None, body("a slow answer [slow]"))
    pid = None
    events = []
    async for event in started.listen():
        events.append(event)
        if event["type"] == "text" and pid is None:
            pid = client_pid(started._client)
            # from now on a 0.1 s pause between deltas is "silence"
            warm.OMNI_TURN_SILENCE_SECONDS = 0.03
    assert events[-1]["type"] == "error" and events[-1]["code"] == "turn_timeout"
    assert await gone(pid, timeout=3), "the silent CLI was not killed"
    assert registry.get("wes", "warm-1") is None and pool.counts()["running"] == 0
    warm.OMNI_TURN_SILENCE_SECONDS = 300
    follow_up, _ = await turn("And now?")
    assert follow_up[-1]["type"] == "done"


async def test_shutdown_leaves_no_cli_process(warm):
    warm.OMNI_SPARE_CLIENTS = 1
    _, pid_a = await turn("a", thread="shut-a")
    running = await start_turn(None, body("long [slow]", thread="shut-b"))
    async for event in running.listen():
        if event["type"] == "text":
            break
    pid_b = client_pid(running._client)
    # the spare the first turn's end started
    await wait_for_async(lambda: pool.spares.get("smart"), timeout=30, message="a spare")
    spare_pid = pool.spares["smart"][0].pid
    await lifecycle.shutdown()  # the server's order: turns, then every warm client and spare
    for pid in (pid_a, pid_b, spare_pid):
        assert await gone(pid, timeout=5), f"CLI {pid} outlived the shutdown"
    assert pool.counts()["warm"] == pool.counts()["spare"] == pool.counts()["running"] == 0


async def test_a_spare_answers_a_new_thread_and_is_replaced(warm, chat_log):
    warm.OMNI_SPARE_CLIENTS = 1
    pool.fill_spares()
    await wait_for_async(lambda: pool.spares.get("smart"), timeout=30, message="a spare")
    spare_pid = pool.spares["smart"][0].pid
    events, pid = await turn("brand new", thread="spare-1")
    assert pid == spare_pid and events[0]["resumed"] is False
    assert "[CHAT] Saved session mapping thread=spare-1" in chat_log.text
    # replaced in the background after the turn
    await wait_for_async(lambda: pool.spares.get("smart"), timeout=30, message="a new spare")
    assert pool.spares["smart"][0].pid not in (None, spare_pid)


async def test_a_full_budget_refuses_with_server_busy_and_recovers(warm):
    warm.OMNI_MAX_PROCESSES = 1
    running = await start_turn(None, body("long [slow]", thread="budget-a"))
    with pytest.raises(ServerBusy) as refused:
        await start_turn(None, body("me too", thread="budget-b"))
    assert refused.value.status == 503 and refused.value.code == "server_busy"
    assert refused.value.retry_after >= 1
    assert [e async for e in running.listen()][-1]["type"] == "done"
    # budget-a's warm client is idle now: it is evicted for budget-b
    events, _ = await turn("me too", thread="budget-b")
    assert events[-1]["type"] == "done" and list(pool.idle) == [("wes", "budget-b")]


async def test_an_evicted_client_still_exiting_counts_against_the_budget(warm):
    warm.OMNI_MAX_PROCESSES = 2
    await turn("first", thread="strict-a")
    await turn("first", thread="strict-b")
    assert len(pool.idle) == 2 and len(cli_processes()) == 2
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, len(cli_processes()))
            await asyncio.sleep(0.005)  # sampling the process count, not waiting

    watcher = asyncio.create_task(watch())
    try:
        # A new thread on a full budget: strict-a's client is evicted, and
        # the new CLI starts only once it has exited.
        events, pid = await turn("first", thread="strict-c")
    finally:
        watcher.cancel()
    assert events[-1]["type"] == "done"
    assert peak == 2, f"{peak} CLI processes ran at once on a budget of 2"
    assert list(pool.idle) == [("wes", "strict-b"), ("wes", "strict-c")]
    assert pool.counts()["exiting"] == 0


async def test_a_resource_over_its_concurrent_turns_is_rate_limited(warm):
    warm.OMNI_MAX_TURNS_PER_RESOURCE = 1
    running = await start_turn(None, body("long [slow]", thread="limit-a"))
    with pytest.raises(RateLimited) as limited:
        await start_turn(None, body("another", thread="limit-b"))
    assert limited.value.status == 429 and limited.value.retry_after >= 1
    other = await start_turn(None, SimpleNamespace(
        message="someone else", threadId="limit-c", resourceId="zoe", agent=None))
    assert [e async for e in other.listen()][-1]["type"] == "done"
    assert [e async for e in running.listen()][-1]["type"] == "done"

