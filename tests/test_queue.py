"""A message for a busy thread (contract §12), in one process with the real
SDK and CLI against the offline model: ``ifBusy`` reject, enqueue and
interrupt, the queue's order, its calls (list, cancel, the websocket
``cancel``), a refusal when a queued turn starts, a thread deleted with
messages waiting, the sweep that picks up a queue nobody started, and the
queue's rows through their states. Across live workers (SIGKILL, two
workers over PostgreSQL and Redis): ``tests/test_queue_e2e.py``."""

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from chat_app import metrics, queue, sdk
from chat_app.models import QueuedMessage
from chat_app.turns import registry, start_turn
from omni.asgi import application
from sessions_app import services
from sessions_app.errors import Conflict, NotFound, RateLimited
from tests.helpers import collect, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk]

body = turn_bodies("quinn")


@pytest.fixture(autouse=True)
def quicker_slow_replies(offline_chat):
    """A ``[slow]`` reply over 1.5 s instead of 3: long enough to queue behind."""
    sdk.offline_model_url()
    model = sdk._offline_model
    model.slow_delay, before = 0.05, model.slow_delay
    yield
    model.slow_delay = before


def heard(events) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text")


def types(events) -> list[str]:
    return [e["type"] for e in events if e["type"] not in ("text", "chunk")]


async def test_queued_messages_run_in_order_after_the_running_turn_on_its_warm_process(warm):
    hits = metrics.WARM_HITS._value.get()
    first = await start_turn(None, body("one [slow]", "q-order", chunks=False))
    # reject (the default) is today's answer
    with pytest.raises(Conflict) as busy:
        await start_turn(None, body("rejected", "q-order"))
    assert busy.value.code == "thread_busy"
    second = await start_turn(None, body("two", "q-order", ifBusy="enqueue", chunks=False))
    third = await start_turn(None, body("three", "q-order", ifBusy="enqueue", chunks=False))
    assert isinstance(second, queue.QueuedStream) and isinstance(third, queue.QueuedStream)

    listed = await queue.listing("quinn", "q-order")
    assert [(q["message"], q["position"]) for q in listed["queued"]] == [("two", 1), ("three", 2)]
    # a message with ifBusy "enqueue" never jumps the queue, even once the thread is free
    ends = {}

    async def read(name, stream):
        ends[name] = asyncio.get_running_loop().time()
        events = await collect(stream)
        ends[name] = asyncio.get_running_loop().time()
        return events

    one, two, three = await asyncio.gather(
        read("one", first.listen()), read("two", second), read("three", third))
    assert types(one) == ["session", "done"]
    # the stream opens with queued, then carries its own turn, session to done
    assert types(two) == ["queued", "session", "done"] and types(three) == ["queued", "session", "done"]
    assert two[0]["position"] == 1 and three[0]["position"] == 2
    assert [e["seq"] for e in two] == list(range(len(two)))
    assert len({e["turnId"] for e in two}) == 1 and two[0]["turnId"] != first.turn_id
    assert heard(two) == 'Offline model heard: "two". Earlier questions: "one [slow]".'
    assert heard(three) == 'Offline model heard: "three". Earlier questions: "one [slow]" | "two".'
    assert ends["one"] <= ends["two"] <= ends["three"]
    # one process served the whole thread: the queued turns ran on its warm client
    assert metrics.WARM_HITS._value.get() - hits == 2
    assert {e["sessionId"] for e in one + two + three if e["type"] == "session"} == {
        one[0]["sessionId"]}
    assert (await queue.listing("quinn", "q-order")) == {"queued": []}
    states = await sync_to_async(lambda: sorted(QueuedMessage.objects.values_list("state", flat=True)))()
    assert states == ["started", "started"]


async def test_cancel_ends_the_stream_and_the_queue_goes_on(warm):
    running = await start_turn(None, body("busy [slow]", "q-cancel", chunks=False))
    doomed = await start_turn(None, body("never", "q-cancel", ifBusy="enqueue"))
    kept = await start_turn(None, body("kept", "q-cancel", ifBusy="enqueue", chunks=False))
    queued = (await queue.listing("quinn", "q-cancel"))["queued"]
    client = AsyncClient()
    # another resource cancels nothing
    other = await client.delete("/api/chat/queue", {"threadId": "q-cancel", "resourceId": "mallory",
                                                    "queueId": queued[0]["queueId"]},
                                content_type="application/json")
    assert other.status_code == 404
    gone = await client.delete("/api/chat/queue", {"threadId": "q-cancel", "resourceId": "quinn",
                                                   "queueId": queued[0]["queueId"]},
                               content_type="application/json")
    assert gone.status_code == 200 and gone.json() == {"success": True, "queueId": queued[0]["queueId"]}
    assert (await client.get("/api/chat/queue", {"threadId": "q-cancel", "resourceId": "quinn"})).json()[
        "queued"][0]["message"] == "kept"
    events = await collect(doomed)
    assert types(events) == ["queued", "error"] and events[-1]["code"] == "cancelled"
    # a client that lost the stream while its message waits picks it up by the queued event's id
    again = await queue.follow("quinn", "q-cancel", turn_id=kept.turn_id, after=0)
    await collect(running.listen())
    rest = await collect(kept)
    assert heard(rest) == 'Offline model heard: "kept". Earlier questions: "busy [slow]".'
    assert [(e["type"], e["seq"]) for e in await collect(again) if e["type"] != "text"] == [
        (e["type"], e["seq"]) for e in rest if e["type"] not in ("text", "queued")]
    # once started it is not in the queue any more: 404
    again = await client.delete("/api/chat/queue", {"threadId": "q-cancel", "resourceId": "quinn",
                                                     "queueId": queued[1]["queueId"]},
                                content_type="application/json")
    assert again.status_code == 404
    assert (await client.get("/api/chat/queue", {"threadId": "nowhere", "resourceId": "quinn"})).status_code == 404
    assert (await client.get("/api/chat/queue", {"threadId": "q-cancel", "resourceId": "mallory"})).status_code == 404


@pytest.mark.engine_agnostic  # the queue's SQL runs on both engines in the tests above
async def test_interrupt_stops_the_turn_and_the_next_call_carries_what_it_said(warm):
    model = sdk._offline_model
    running = await start_turn(None, body("long story [slow]", "q-int", chunks=False))
    events = running.listen()
    said = ""
    async for event in events:  # a few words in
        if event["type"] == "text":
            said += event["text"]
            if len(said) > 12:
                break
    waiting = await start_turn(None, body("enqueued first", "q-int", ifBusy="enqueue", chunks=False))
    before = len(model.requests)
    now = await start_turn(None, body("stop, do this", "q-int", ifBusy="interrupt", chunks=False))
    assert isinstance(now, queue.QueuedStream)
    rest = [e async for e in events]
    assert rest[-1]["type"] == "done"
    interrupted = await collect(now)
    # no queued event: it runs as soon as the turn ended, ahead of the queue
    assert types(interrupted) == ["session", "done"] and interrupted[0]["seq"] == 0
    assert heard(interrupted).startswith('Offline model heard: "stop, do this". Earlier questions: "long story')
    call = next(r for r in model.requests[before:] if r.get("stream") and any(
        "stop, do this" in json.dumps(m) for m in r["messages"]))
    assistant = "".join(json.dumps(m["content"]) for m in call["messages"] if m["role"] == "assistant")
    assert said[:12] in assistant  # the model saw what the interrupted turn said
    last = await collect(waiting)
    assert heard(last).startswith('Offline model heard: "enqueued first".')
    assert '"stop, do this"' in heard(last)


@pytest.mark.engine_agnostic  # the queue's SQL runs on both engines in the tests above
async def test_a_queued_message_is_checked_when_queued_and_again_when_it_starts(warm):
    running = await start_turn(None, body("first [slow]", "q-check", chunks=False))
    with pytest.raises(NotFound):  # an unknown upload is refused at once, not when it would run
        await start_turn(None, body("see this", "q-check", ifBusy="enqueue",
                                    attachments=["att-00000000000000000000000000000000"]))
    await collect(running.listen())


async def test_queue_full_and_budget_checked_when_the_queued_turn_starts(warm, settings):
    settings.OMNI_MAX_QUEUED_PER_THREAD = 2
    running = await start_turn(None, body("first [slow]", "q-full", chunks=False))
    a = await start_turn(None, body("a", "q-full", ifBusy="enqueue", chunks=False))
    b = await start_turn(None, body("b", "q-full", ifBusy="enqueue", chunks=False))
    with pytest.raises(RateLimited) as full:
        await start_turn(None, body("c", "q-full", ifBusy="enqueue"))
    assert full.value.status == 429 and full.value.code == "queue_full"
    # the day's budget is spent before "a" starts: its stream's error; the queue goes on
    settings.OMNI_DAILY_BUDGET_USD = 0.000001
    await collect(running.listen())
    first, second = await collect(a), await collect(b)
    assert types(first) == ["queued", "error"] and first[-1]["code"] == "budget_exceeded"
    assert types(second) == ["queued", "error"] and second[-1]["code"] == "budget_exceeded"


async def test_deleting_the_thread_ends_every_waiting_stream(warm):
    running = await start_turn(None, body("first [slow]", "q-del", chunks=False))
    waiting = [await start_turn(None, body(f"w{i}", "q-del", ifBusy="enqueue")) for i in range(2)]
    await wait_for_async(lambda: any(e["type"] == "session" for e in running.events))
    await services.delete_session("q-del", "quinn")
    for stream in waiting:
        events = await asyncio.wait_for(collect(stream), 10)
        assert types(events) == ["queued", "error"] and events[-1]["code"] == "thread_deleted"
    assert await sync_to_async(QueuedMessage.objects.count)() == 0
    await collect(running.listen())


async def test_the_sweep_starts_a_queue_nobody_kicked_and_a_dead_attempt_runs_again(warm):
    # a queue left behind (its worker died): rows waiting and one "starting", no lease
    first = await collect((await start_turn(None, body("hello", "q-sweep", chunks=False))).listen())
    assert first[-1]["type"] == "done"
    from chat_app.turns import TurnSpec, queued
    from chat_app.sdk import agent_preset

    agent, preset = agent_preset(None)
    rows = []
    for text in ("left behind", "after it"):
        s = TurnSpec("quinn", "q-sweep", text, agent, preset)
        rows.append(await sync_to_async(queued.insert_sync)(s, "enqueue", "someone"))
    await sync_to_async(queued.mark_starting_sync)(rows[0])  # its worker died before storing it
    # a thread whose tool call waits is left to the turn that goes on after the decision
    from sessions_app.models import SessionMapping

    await services.save_session("q-deciding", "quinn", "s-deciding")
    await SessionMapping.objects.filter(thread_id="q-deciding").aupdate(pending_approval_id="appr-1")
    await sync_to_async(queued.insert_sync)(TurnSpec("quinn", "q-deciding", "later", agent, preset),
                                            "enqueue", "someone")
    assert await sync_to_async(queued.orphaned_threads_sync)() == [("quinn", "q-sweep")]
    started = await queue.sweep()
    assert [t.turn_id for t in started] == [rows[0].turn_id]  # the same turn id: its stream follows it
    events = await collect(started[0].listen())
    assert types(events) == ["queued", "session", "done"]
    assert heard(events) == 'Offline model heard: "left behind". Earlier questions: "hello".'
    # the turn's end started the next one (the worker that frees a thread kicks its queue)
    await wait_for_async(lambda: registry.by_id(rows[1].turn_id) is not None)
    await collect(registry.by_id(rows[1].turn_id).listen())
    states = await sync_to_async(lambda: list(QueuedMessage.objects.filter(thread_id="q-sweep").order_by("id")
                                              .values_list("state", flat=True)))()
    assert states == ["started", "started"]


@pytest.mark.engine_agnostic  # the queue's SQL runs on both engines in the tests above
async def test_websocket_enqueue_and_cancel(warm):
    socket = WebsocketCommunicator(application, "/ws/chat/")
    connected, _ = await socket.connect()
    assert connected
    await socket.send_json_to({"type": "message", "message": "ws one [slow]", "threadId": "q-ws",
                               "resourceId": "quinn", "chunks": False})
    assert (await socket.receive_json_from(10))["type"] == "session"
    await socket.send_json_to({"type": "message", "message": "ws two", "threadId": "q-ws",
                               "resourceId": "quinn", "ifBusy": "enqueue", "chunks": False})
    got = [await socket.receive_json_from(10)]
    while got[-1]["type"] != "queued":
        got.append(await socket.receive_json_from(10))
    queued_event = got[-1]
    await socket.send_json_to({"type": "cancel", "threadId": "q-ws", "resourceId": "quinn",
                               "queueId": queued_event["queueId"]})
    seen = []
    while not any(e.get("code") == "cancelled" for e in seen):
        seen.append(await socket.receive_json_from(10))
    cancelled = seen[-1]
    assert cancelled["turnId"] == queued_event["turnId"] and cancelled["seq"] == 1
    await socket.send_json_to({"type": "cancel", "threadId": "q-ws", "resourceId": "quinn",
                               "queueId": queued_event["queueId"]})
    while True:
        event = await socket.receive_json_from(10)
        if event["type"] == "error":
            assert event["code"] == "not_found" and event["threadId"] == "q-ws"
            break
    await socket.disconnect()


@pytest.mark.engine_agnostic  # the queue's SQL runs on both engines in the tests above
async def test_a_thread_waiting_for_a_decision_keeps_its_queue_until_the_decisions_turn_ended(warm):
    from types import SimpleNamespace

    from chat_app import approvals

    await collect((await start_turn(None, body("keep me", "q-keep", agent="datadog"))).listen())
    asking = await start_turn(None, body(
        'Delete it [tool delete_conversation {"threadId": "q-keep"}]', "q-appr", chunks=False))
    request = None
    events = asking.listen()
    async for event in events:
        if event["type"] == "approval_request":
            request = event
            break
    assert request is not None
    waiting = await start_turn(None, body("after the decision", "q-appr", ifBusy="enqueue", chunks=False))
    waiting = aiter(waiting)
    first = await anext(waiting)
    assert first["type"] == "queued"
    await asyncio.sleep(0.3)  # nothing starts while the call waits
    assert [q["message"] for q in (await queue.listing("quinn", "q-appr"))["queued"]] == ["after the decision"]
    await approvals.decide(None, SimpleNamespace(threadId="q-appr", resourceId="quinn",
                                                 approvalId=request["approvalId"], decision="deny",
                                                 message="not now"))
    rest = [e async for e in events]
    assert [e["type"] for e in rest if e["type"] != "text"][-1] == "done"
    after = await collect(waiting)
    assert types(after) == ["session", "done"]
    assert heard(after).startswith('Offline model heard: "after the decision". Earlier questions: "Delete it')
