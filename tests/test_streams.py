"""Scale-out pieces in one process (real SDK and CLI, offline model): ``seq``,
``turnId`` and SSE ids, cursors that name their turn, heartbeats, the turn's lease, ``GET /api/chat/stream``, the follow and
interrupt protocol over a channel layer, health and graceful shutdown.

The channel-layer protocol runs here over the in-memory layer with the
local shortcut turned off, so a "remote" follower talks to this process's
hub exactly as it would to another worker's over Redis
(``tests/test_scale_out.py`` does it across two live workers)."""

import asyncio
import json

import pytest
from django.test import AsyncClient

from chat_app import leases, streams
from chat_app.turns import registry, start_turn
from sessions_app.errors import Conflict, NotFound, ServerBusy
from tests.helpers import collect, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]


body = turn_bodies("sam")


def assert_whole_turn(events):
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "session" and events[-1]["type"] in ("done", "error")
    assert len({(e["turnId"], e["threadId"]) for e in events}) == 1


async def test_every_event_has_its_seq_and_the_lease_lives_exactly_as_long_as_the_turn(offline_chat):
    turn = await start_turn(None, body("Hello [slow]", "seq-1"))
    lease = await leases.active("sam", "seq-1")
    assert lease is not None and lease.turn_id == turn.turn_id and lease.token == turn.lease.token
    # another process (no local turn) cannot take the thread meanwhile
    with pytest.raises(Conflict) as busy:
        await leases.acquire("sam", "seq-1", "another")
    assert busy.value.code == "thread_busy" and busy.value.retry_after >= 1
    events = await collect(turn.listen())
    assert_whole_turn(events)
    assert events[-1]["type"] == "done"
    assert {(e["turnId"], e["threadId"]) for e in events} == {(turn.turn_id, "seq-1")}
    # released before "done" was readable: the next turn may start anywhere at once
    assert await leases.active("sam", "seq-1") is None


async def test_a_thread_leased_by_another_process_is_busy_here(offline_chat):
    other = await leases.acquire("sam", "elsewhere", "theirs")  # as another worker would
    with pytest.raises(Conflict) as busy:
        await start_turn(None, body("me too", "elsewhere"))
    assert busy.value.code == "thread_busy"
    assert 28 <= busy.value.retry_after <= 30  # the lease's remaining time
    await other.release()
    events = await collect((await start_turn(None, body("now", "elsewhere"))).listen())
    assert events[-1]["type"] == "done"


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """``(id, event)`` of each SSE event (comment lines left out)."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        out.append((fields["id"], json.loads(fields["data"])))
    return out


async def read_stream(response) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


async def test_sse_ids_and_following_with_last_event_id(offline_chat):
    client = AsyncClient()
    missing = await client.get("/api/chat/stream", {"threadId": "sse-1", "resourceId": "sam"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    posted = await client.post("/api/chat", {"message": "Hi [slow]", "threadId": "sse-1",
                                             "resourceId": "sam"}, content_type="application/json")
    assert posted.status_code == 200
    turn_id = registry.get("sam", "sse-1").turn_id
    followed = await client.get("/api/chat/stream", {"threadId": "sse-1", "resourceId": "sam"},
                                headers={"Last-Event-ID": f"{turn_id}:2"})
    assert followed.status_code == 200 and followed["Content-Type"] == "text/event-stream"
    whole = sse_events(await read_stream(posted))
    assert [i for i, _ in whole] == [f"{turn_id}:{e['seq']}" for _, e in whole]
    assert [e["seq"] for _, e in whole] == list(range(len(whole)))
    assert whole[-1][1]["type"] == "done"
    assert sse_events(await read_stream(followed)) == whole[3:]

    # the turn ended: no turn runs, but a reconnecting client still gets its tail
    idle = await client.get("/api/chat/stream", {"threadId": "sse-1", "resourceId": "sam"})
    assert idle.status_code == 404
    tail = await client.get("/api/chat/stream", {"threadId": "sse-1", "resourceId": "sam"},
                            headers={"Last-Event-ID": whole[-2][0]})
    assert tail.status_code == 200 and sse_events(await read_stream(tail)) == whole[-1:]

    for bad_id in ("soon", "2", f"{turn_id}:", f"{turn_id}:-1", f"{turn_id}:\u00b2", "\u00b9\u00b2",
                   "9" * 5000, f"{turn_id}:{'9' * 5000}", f"x{turn_id}:1 2"):
        bad = await client.get("/api/chat/stream", {"threadId": "sse-1", "resourceId": "sam"},
                               headers={"Last-Event-ID": bad_id})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request", bad_id


async def test_a_stale_cursor_never_yields_another_turns_events(offline_chat):
    """A client reconnecting with the cursor of a turn that ended, after the
    thread's next turn began: the old turn's tail (while it lingers) or 404,
    never the new turn's events as if they were the old one's."""
    client = AsyncClient()
    first = await start_turn(None, body("One", "stale-1"))
    old = await collect(first.listen())
    second = await start_turn(None, body("Two [slow]", "stale-1"))
    async for event in second.listen():
        if event["seq"] >= 4:
            break  # the new turn is well past the old cursor
    last = f"{first.turn_id}:{len(old) - 1}"  # had everything of the first turn
    rest = await client.get("/api/chat/stream", {"threadId": "stale-1", "resourceId": "sam"},
                            headers={"Last-Event-ID": last})
    assert rest.status_code == 200 and sse_events(await read_stream(rest)) == []
    middle = await client.get("/api/chat/stream", {"threadId": "stale-1", "resourceId": "sam"},
                              headers={"Last-Event-ID": f"{first.turn_id}:1"})
    got = [e for _, e in sse_events(await read_stream(middle))]
    assert got == old[2:] and {e["turnId"] for e in got} == {first.turn_id}
    # one past the turn's end: nothing more of it, and nothing of the next one
    stream = await streams.follow("sam", "stale-1", turn_id=first.turn_id, after=len(old) + 5)
    assert await collect(stream) == []
    # the same over the websocket's follow: afterSeq counts in its turnId
    stream = await streams.follow("sam", "stale-1", turn_id=first.turn_id, after=2)
    assert await collect(stream) == old[3:]
    await collect(second.listen())
    # once the first turn's linger is over: 404, not the second turn
    registry._forget(first)
    gone = await client.get("/api/chat/stream", {"threadId": "stale-1", "resourceId": "sam"},
                            headers={"Last-Event-ID": last})
    assert gone.status_code == 404
    with pytest.raises(NotFound):
        await streams.follow("sam", "stale-1", turn_id=first.turn_id, after=0)


async def test_sse_sends_a_heartbeat_while_a_turn_is_quiet(offline_chat):
    """A comment line every OMNI_SSE_HEARTBEAT_SECONDS of quiet (a proxy's
    idle timeout must not cut the stream); the events are unchanged."""
    offline_chat.OMNI_SSE_HEARTBEAT_SECONDS = 0.2
    response = await AsyncClient().post(
        "/api/chat", {"message": "Wait [pause 1.5]", "threadId": "beat-1", "resourceId": "sam"},
        content_type="application/json")
    raw = await read_stream(response)
    beats = raw.decode().count(": keep-alive\n\n")
    assert beats >= 3, raw
    events = [e for _, e in sse_events(raw)]
    assert_whole_turn(events) or events[-1]["type"] == "done"


@pytest.fixture
def remote_only(monkeypatch):
    """Followers and interrupts take the channel-layer path (as on another
    worker); the owner's hub still finds its turns."""
    monkeypatch.setattr(streams, "distributed", lambda: True)
    monkeypatch.setattr(registry, "get", lambda resource, thread: None)
    yield


async def test_a_remote_follower_gets_every_event_once_in_order(offline_chat, remote_only):
    turn = await start_turn(None, body("Tell me [slow]", "remote-1"))
    async for event in turn.listen():
        if event["type"] == "text":
            break  # mid-turn
    everything = await streams.follow("sam", "remote-1")
    assert everything.turn_id == turn.turn_id
    after_five = await streams.follow("sam", "remote-1", turn_id=turn.turn_id, after=5)
    after_zero = await streams.follow("sam", "remote-1", turn_id=turn.turn_id, after=0)
    whole, tail, filled = await asyncio.gather(
        collect(everything), collect(after_five), collect(after_zero))
    assert_whole_turn(whole)
    assert whole == turn.events and whole[-1]["type"] == "done"
    assert tail == turn.events[6:]
    assert filled == turn.events[1:]


async def test_a_follower_asks_again_for_a_missing_event(offline_chat, remote_only):
    turn = await start_turn(None, body("Gap [slow]", "remote-gap"))
    async for event in turn.listen():
        if event["seq"] >= 3:
            break
    follow = streams.RemoteFollow(turn.turn_id, "remote-gap", -1, "unused")
    follow.pending = {e["seq"]: e for e in turn.events[2:4]}  # 0 and 1 never came
    follow.channel = await streams.layer().new_channel()
    await streams.layer().group_add(streams.event_group(turn.turn_id), follow.channel)
    assert await asyncio.wait_for(collect(follow._events()), 20) == turn.events


async def test_a_remote_follow_of_a_dead_owner_is_404(offline_chat, remote_only):
    await leases.acquire("sam", "orphan", "nobody")  # a lease whose worker answers nothing
    with pytest.raises(NotFound):
        await streams.follow("sam", "orphan")
    with pytest.raises(NotFound):
        await streams.follow("sam", "never-ran", turn_id="nobody", after=3)


async def test_an_interrupt_nobody_answers_is_answered(offline_chat, remote_only):
    """A live lease whose worker does not answer (stuck, or of another host):
    the interrupt says so, with Retry-After (the lease's remaining time),
    instead of being dropped."""
    await leases.acquire("sam", "mute", "nobody")
    with pytest.raises(streams.TurnLost) as lost:
        await streams.interrupt("sam", "mute")
    assert lost.value.code == "turn_lost" and 25 <= lost.value.retry_after <= 31


async def test_an_interrupt_reaches_the_turn_over_the_layer(offline_chat, remote_only):
    turn = await start_turn(None, body("Long one [slow]", "remote-2"))
    async for event in turn.listen():
        if event["type"] == "text":
            break
    loop = asyncio.get_running_loop()
    started = loop.time()
    await streams.interrupt("sam", "remote-2")
    events = await collect(turn.listen())
    assert loop.time() - started < 2.5  # the slow reply alone takes 3 s; expected under 0.8 s
    assert events[-1]["type"] == "done" and events[-1]["result"]["isError"] is True
    with pytest.raises(NotFound):
        await streams.interrupt("sam", "remote-2")


async def test_health_without_a_channel_layer(offline_chat):
    response = await AsyncClient().get("/api/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "channelLayer": "off", "turns": "ok"},
                               "processes": {"running": 0, "warm": 0, "spare": 0, "exiting": 0, "budget": 24,
                                             "draining": False}}


async def test_health_needs_no_credentials(offline_chat):
    offline_chat.OMNI_AUTH = "required"
    response = await AsyncClient().get("/api/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert (await AsyncClient().get("/api/chat/stream", {"threadId": "t"})).status_code == 401


async def test_health_is_503_when_redis_is_unreachable(offline_chat, settings):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [dead]}}}
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await AsyncClient().get("/api/health")
    assert loop.time() - started < 3  # expected at most health.CHECK_SECONDS (1 s)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert body["checks"] == {"database": "ok", "channelLayer": "error", "turns": "ok"}
    assert dead not in response.content.decode()  # reveals nothing


async def test_shutdown_refuses_new_turns_and_lets_running_ones_finish(offline_chat):
    turn = await start_turn(None, body("Finish me [slow]", "drain-1"))
    stopping = asyncio.create_task(registry.shutdown(grace=20))
    try:
        await wait_for_async(lambda: registry.draining, timeout=10, interval=0, message="the shutdown began")
        with pytest.raises(ServerBusy) as busy:
            await start_turn(None, body("new", "drain-2"))
        assert busy.value.status == 503 and busy.value.code == "server_busy"
        assert busy.value.retry_after >= 1
        await asyncio.wait_for(stopping, 30)
        assert turn.events[-1]["type"] == "done" and turn.events[-1]["result"]["isError"] is False
    finally:
        registry.draining = False


async def test_shutdown_interrupts_what_outlasts_the_grace(offline_chat):
    turn = await start_turn(None, body("Too long [slow]", "drain-3"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await registry.shutdown(grace=0.3)
    finally:
        registry.draining = False
    assert loop.time() - started < 2.5  # expected ~0.8 s: the 0.3 s grace, then interrupted (3 s to its end)
    assert turn.finished and turn.events[-1]["result"]["isError"] is True
    assert await leases.active("sam", "drain-3") is None


async def test_a_turn_that_loses_its_lease_stops_and_leaves_the_new_holder_alone(offline_chat):
    offline_chat.OMNI_LEASE_SECONDS = 1.5  # renewed every 0.5 s
    turn = await start_turn(None, body("Stall [slow]", "stolen"))
    async for event in turn.listen():
        if event["type"] == "text":
            break
    from asgiref.sync import sync_to_async
    from django.utils import timezone

    from chat_app.models import ThreadLease

    # as if this worker had stalled past the expiry and another took over
    await ThreadLease.objects.filter(thread_id="stolen").aupdate(expires_at=timezone.now())
    thief = await sync_to_async(leases.acquire_sync)("sam", "stolen", "thief")
    assert isinstance(thief, leases.Lease) and thief.token == turn.lease.token + 1
    events = await asyncio.wait_for(collect(turn.listen()), 10)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "lease_lost"
    assert events[-1]["seq"] == len(events) - 1
    assert (await leases.active("sam", "stolen")).turn_id == "thief"  # not released by the loser


async def test_a_thread_watch_says_which_turns_started(offline_chat, monkeypatch):
    """A queued message's stream skips its read when only another message's
    turn started (with many waiting, their reads delayed the turn)."""
    key = ("sam", "watch-1")
    async with streams.ThreadWatch(key) as watch:
        await streams.wake_thread(key, "t-1")
        assert await watch.wait(1) == {"t-1"}
        await streams.wake_thread(key, "t-2")
        await streams.wake_thread(key)  # something else too: the watcher looks
        assert await watch.wait(1) is None
        assert await watch.wait(0.01) is None  # a timeout
    monkeypatch.setattr(streams, "distributed", lambda: True)
    async with streams.ThreadWatch(key) as watch:  # another worker's start, over the channel layer
        await streams.layer().group_send(streams.thread_group(key), {"type": "omni.started", "turn": "t-3"})
        assert await watch.wait(1) == {"t-3"}
        await streams.layer().group_send(streams.thread_group(key), {"type": "omni.queue"})
        assert await watch.wait(1) is None
