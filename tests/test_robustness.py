"""A delete, a reconnect, a lost or pruned lease cannot lose, resurrect or
misroute a turn (issue 14), in this process (real SDK and CLI, offline
model); tests/test_scale_out.py does the cross-worker cases on live servers."""

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import OperationalError
from django.utils import timezone

from chat_app import leases, streams
from chat_app.models import ThreadLease
from chat_app.pool import pool
from chat_app.turns import start_turn
from tests.test_consumer import connect, until_end
from sessions_app import selectors, services
from sessions_app.models import SessionMapping, TranscriptEntry
from tests.helpers import cli_processes, collect, events_of, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]


body = turn_bodies("rob")


async def until(turn, kind):
    async for event in turn.listen():
        if event["type"] == kind:
            return event


async def stored_lines(session_id):
    return await TranscriptEntry.objects.filter(session_id=session_id).acount()


async def assert_gone(thread, session_id, resource="rob"):
    assert await selectors.get_mapping(thread, resource) is None, "the turn brought the thread back"
    assert await stored_lines(session_id) == 0, "the turn left its transcript behind"
    assert not await ThreadLease.objects.filter(resource_id=resource, thread_id=thread).aexists()
    assert (resource, thread) not in pool.idle, "a process still holds the deleted conversation"


# --- a delete during a running turn ------------------------------------------------

@pytest.mark.parametrize("follow_up", [False, True], ids=["first-turn", "follow-up"])
async def test_a_delete_stops_the_running_turn_and_is_never_undone(offline_chat, follow_up):
    thread = f"del-{follow_up}"
    if follow_up:  # a warm client holds the conversation already
        await events_of(await start_turn(None, body("Remember me", thread)))
        assert ("rob", thread) in pool.idle
    turn = await start_turn(None, body("A long reply [slow]", thread))
    session = await until(turn, "session")
    await until(turn, "text")
    started = asyncio.get_running_loop().time()
    await services.delete_session(thread, "rob")
    events = await asyncio.wait_for(events_of(turn), 10)
    assert asyncio.get_running_loop().time() - started < 2.5  # stopped, not run to its end (3 s); expected under 0.8 s
    assert events[-1]["type"] == "error" and events[-1]["code"] == "thread_deleted"
    assert events[-1]["threadId"] == thread and events[-1]["turnId"] == turn.turn_id
    # anything the CLI flushed late is erased too: once it has exited, it can flush nothing more
    await wait_for_async(lambda: not cli_processes(), message="the turn's CLI exited")
    await assert_gone(thread, session["sessionId"])
    # the thread id starts afresh: nothing of the deleted conversation comes back
    again = await events_of(await start_turn(None, body("Hello again", thread)))
    assert again[0]["resumed"] is False and again[0]["sessionId"] != session["sessionId"]
    text = "".join(e["text"] for e in again if e["type"] == "text")
    assert text == 'Offline model heard: "Hello again". Earlier questions: none.'


async def test_a_delete_from_another_process_stops_the_turn_through_its_lease(offline_chat):
    """``prune_sessions`` (or a worker with no channel layer to this one)
    deletes the rows only: the lease row's deletion stops the turn at its
    next renewal, and it saves nothing."""
    offline_chat.OMNI_LEASE_SECONDS = 0.9  # renewed every 0.3 s
    thread = "del-elsewhere"
    await events_of(await start_turn(None, body("First", thread)))
    turn = await start_turn(None, body("Second [slow]", thread))
    session = await until(turn, "session")
    await until(turn, "text")

    def delete_behind_our_back():
        mapping = SessionMapping.objects.get(thread_id=thread)
        services._delete_rows(mapping)
        leases.forget_sync("rob", thread)

    await sync_to_async(delete_behind_our_back)()
    events = await asyncio.wait_for(events_of(turn), 10)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "thread_deleted"
    await wait_for_async(lambda: not cli_processes(), message="the turn's CLI exited")  # it can flush no more
    assert await selectors.get_mapping(thread, "rob") is None
    assert await stored_lines(session["sessionId"]) == 0


# --- error events name their turn and thread -----------------------------------------

async def test_error_events_name_their_thread_and_turn(offline_chat):
    comm = await connect()
    try:
        # two threads at once; one is refused (busy), the other runs and fails
        await comm.send_json_to({"type": "message", "message": "ok [slow]", "threadId": "e-1",
                                 "resourceId": "rob"})
        await comm.send_json_to({"type": "message", "message": "again", "threadId": "e-1",
                                 "resourceId": "rob"})
        await comm.send_json_to({"type": "follow", "threadId": "e-2", "resourceId": "rob"})
        seen = {}
        while len(seen) < 2:
            event = await comm.receive_json_from(timeout=30)
            if event["type"] == "error":
                seen[event["code"]] = event
        busy, missing = seen["thread_busy"], seen["not_found"]
        assert busy["threadId"] == "e-1" and "turnId" not in busy  # a refused frame: no turn ran
        assert missing["threadId"] == "e-2"
        rest = await until_end(comm)
        assert rest[-1]["type"] == "done" and {e["threadId"] for e in rest} == {"e-1"}
        assert len({e["turnId"] for e in rest}) == 1

        # an error that ends a running turn names it
        registry_turn = await start_turn(None, body("A long reply [slow]", "e-3"))
        await until(registry_turn, "text")
        await comm.send_json_to({"type": "follow", "threadId": "e-3", "resourceId": "rob"})
        await services.delete_session("e-3", "rob")
        followed = await until_end(comm)
        assert followed[-1]["code"] == "thread_deleted"
        assert followed[-1]["threadId"] == "e-3" and followed[-1]["turnId"] == registry_turn.turn_id
    finally:
        await comm.disconnect()


# --- the next message right after done -----------------------------------------------

async def test_a_message_sent_the_instant_done_arrives_loses_nothing(offline_chat):
    """Each turn's forwarder is its own: the next turn on the thread starts
    while the last one's forwarder may still be finishing, and every event
    of every turn arrives, in order, once."""
    comm = await connect()
    try:
        turn_ids = []
        for i in range(12):
            await comm.send_json_to({"type": "message", "message": f"Quick {i}", "threadId": "fast",
                                     "resourceId": "rob"})
            events = await until_end(comm)
            assert events[0]["type"] == "session", events[:2]
            assert [e["seq"] for e in events] == list(range(len(events)))
            assert events[-1]["type"] == "done", events[-1]
            assert len({e["turnId"] for e in events}) == 1
            turn_ids.append(events[0]["turnId"])
        assert len(set(turn_ids)) == 12
        assert await comm.receive_nothing(0.2)
    finally:
        await comm.disconnect()


# --- bad frames never close the socket -------------------------------------------------

async def test_any_failure_handling_a_frame_is_an_error_event_and_the_socket_stays_open(
        offline_chat, monkeypatch):
    comm = await connect()
    try:
        await comm.send_to(text_data="[" * 100_000)  # deeply nested JSON
        event = await comm.receive_json_from(timeout=5)
        assert event["type"] == "error" and event["code"] == "bad_request"

        async def unreachable(*args, **kwargs):
            raise OperationalError("could not connect to server: db.internal.example")

        monkeypatch.setattr("chat_app.consumers.start_turn", unreachable)
        await comm.send_json_to({"type": "message", "message": "hi", "threadId": "db-1",
                                 "resourceId": "rob"})
        event = await comm.receive_json_from(timeout=5)
        assert event["type"] == "error" and event["code"] == "unavailable"
        assert event["threadId"] == "db-1" and event["retryAfter"] >= 1
        assert "db.internal" not in event["message"]
        monkeypatch.undo()

        await comm.send_json_to({"type": "follow", "threadId": "db-1", "resourceId": "rob",
                                 "afterSeq": 3})  # a cursor must name its turn
        event = await comm.receive_json_from(timeout=5)
        assert event["type"] == "error" and event["code"] == "bad_request"
        assert "turnId" in event["message"]

        await comm.send_json_to({"type": "message", "message": "still here", "threadId": "db-1",
                                 "resourceId": "rob"})
        assert (await until_end(comm))[-1]["type"] == "done"
    finally:
        await comm.disconnect()


# --- a socket holds no finished turn ----------------------------------------------------

async def test_a_socket_forgets_its_finished_turns(offline_chat):
    from chat_app.consumers import ChatConsumer

    consumers = []
    original = ChatConsumer.connect

    async def remember(self):
        consumers.append(self)
        await original(self)

    ChatConsumer.connect = remember
    try:
        comm = await connect()
    finally:
        ChatConsumer.connect = original
    try:
        for i in range(3):
            await comm.send_json_to({"type": "message", "message": f"Turn {i}",
                                     "threadId": f"mem-{i}", "resourceId": "rob"})
            await until_end(comm)
        consumer = consumers[0]
        await wait_for_async(lambda: consumer.forwarders == {} and consumer.own_turns == {}, timeout=10,
                             message=lambda: (consumer.forwarders, consumer.own_turns))
    finally:
        await comm.disconnect()


# --- leftovers ----------------------------------------------------------------------------

async def test_lease_rows_go_with_their_thread_and_with_prune_sessions(offline_chat):
    await events_of(await start_turn(None, body("Keep", "lease-kept")))
    await events_of(await start_turn(None, body("Delete", "lease-deleted")))
    assert await ThreadLease.objects.acount() == 2
    await services.delete_session("lease-deleted", "rob")
    assert [t async for t in ThreadLease.objects.values_list("thread_id", flat=True)] == ["lease-kept"]

    # rows left by turns whose thread never got a mapping, long lapsed
    long_ago = timezone.now() - timedelta(hours=2)
    await ThreadLease.objects.acreate(resource_id="rob", thread_id="never-saved", turn_id="x",
                                      expires_at=long_ago)
    await ThreadLease.objects.acreate(resource_id="rob", thread_id="just-ended", turn_id="y",
                                      expires_at=timezone.now())
    await sync_to_async(call_command)("prune_sessions", "--older-than", "30d")
    left = {t async for t in ThreadLease.objects.values_list("thread_id", flat=True)}
    assert left == {"lease-kept", "just-ended"}  # a live thread's row and a fresh one stay


async def test_an_interrupt_for_a_dead_workers_lease_is_answered_and_frees_the_thread(offline_chat):
    """The lease of a process of this host that died: the interrupt says so
    and the thread is free at once (no waiting out the lease)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = leases.process_start(child.pid)
    child.kill()
    child.wait()
    await ThreadLease.objects.acreate(
        resource_id="rob", thread_id="orphaned", turn_id="dead", token=3,
        expires_at=timezone.now() + timedelta(seconds=30),
        host_id=leases.HOST_ID, pid=child.pid, pid_started=started)
    with pytest.raises(streams.TurnLost) as lost:
        await streams.interrupt("rob", "orphaned")
    assert lost.value.code == "turn_lost"
    assert await leases.active("rob", "orphaned") is None
    events = await events_of(await start_turn(None, body("Mine now", "orphaned")))
    assert events[-1]["type"] == "done"


async def test_refused_turns_leave_no_lease_rows(offline_chat):
    """A refused request writes nothing: forks of a missing parent (404), a
    fork onto a taken thread (409), turns over a limit (429)."""
    from chat_app import limits
    from sessions_app.errors import Conflict, NotFound, RateLimited

    await events_of(await start_turn(None, body("Parent", "lease-parent")))
    before = await ThreadLease.objects.acount()
    for i in range(20):
        fork = SimpleNamespace(message="hi", threadId=f"child-{i}", forkFromThreadId="no-such-parent",
                               resourceId="rob", agent=None, atMessageUuid=None)
        with pytest.raises(NotFound):
            await start_turn(None, fork, fork=True)
    taken = SimpleNamespace(message="hi", threadId="lease-parent", forkFromThreadId="lease-parent",
                            resourceId="rob", agent=None, atMessageUuid=None)
    with pytest.raises(Conflict):
        await start_turn(None, taken, fork=True)
    offline_chat.OMNI_TURNS_PER_MINUTE = 1  # the parent's turn used it up
    limits.reset()
    for i in range(20):
        with pytest.raises(RateLimited):
            await start_turn(None, body("over the limit", f"limited-{i}"))
    assert await ThreadLease.objects.acount() == before
    assert not await SessionMapping.objects.filter(thread_id__startswith="limited-").aexists()


async def test_a_follow_past_the_end_of_a_turn_ends(offline_chat, monkeypatch):
    """A cursor at or past a turn's last event: the follow ends at once (an
    error on the websocket), locally and over the channel layer."""
    turn = await start_turn(None, body("Short", "past-end"))
    events = await events_of(turn)
    comm = await connect()
    try:
        await comm.send_json_to({"type": "follow", "threadId": "past-end", "resourceId": "rob",
                                 "turnId": turn.turn_id, "afterSeq": len(events) + 3})
        event = await comm.receive_json_from(timeout=5)
        assert event["type"] == "error" and event["code"] == "not_found"
        assert event["threadId"] == "past-end"
    finally:
        await comm.disconnect()
    # over the channel layer: the owner (this process's hub, on the in-memory
    # layer) says the turn ended, so the follower stops without waiting
    from chat_app.streams import RemoteFollow
    from sessions_app.errors import NotFound

    monkeypatch.setattr(streams, "distributed", lambda: True)
    await streams.hub.attach(turn)  # as when the turn started on a Redis deployment
    started = asyncio.get_running_loop().time()
    follow = await RemoteFollow.open(turn.turn_id, "past-end", len(events) + 3, NotFound("gone"))
    assert await asyncio.wait_for(collect(follow), 5) == []
    assert asyncio.get_running_loop().time() - started < 5  # expected at once (one channel-layer round trip)


async def test_a_delete_the_instant_a_turn_starts_returns_at_once(offline_chat):
    """The turn stops before its CLI answered anything; the delete does not
    wait on the CLI (whose interrupt may never be answered once it closes)."""
    await events_of(await start_turn(None, body("First", "del-instant")))
    for i in range(3):
        turn = await start_turn(None, body(f"Again {i} [slow]", "del-instant"))
        # its message is on its way to the CLI (checked at every turn of the loop: the instant matters)
        await wait_for_async(lambda: turn._client is not None, interval=0, message="the turn has its client")
        await asyncio.wait_for(services.delete_session("del-instant", "rob"), 3)
        events = await asyncio.wait_for(events_of(turn), 10)
        assert events[-1]["code"] == "thread_deleted"
        assert await selectors.get_mapping("del-instant", "rob") is None
        await events_of(await start_turn(None, body("Back", "del-instant")))
