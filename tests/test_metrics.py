"""``GET /metrics`` (contract §2, §10): the token, and what it counts. Real
turns in this process (SDK and CLI against the offline model); the metrics
are this process's, so each test compares before and after."""


import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient, Client
from prometheus_client.parser import text_string_to_metric_families

from chat_app.turns import start_turn
from omni.asgi import application
from tests.helpers import turn_bodies

TOKEN = "metrics-test-token"


def scrape_sync(client=None, token=TOKEN) -> dict:
    response = (client or Client()).get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    return parse(response)


async def scrape(token=TOKEN) -> dict:
    response = await AsyncClient().get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.content
    return parse(response)


def parse(response) -> dict:
    """``{(sample name, frozenset of labels): value}``."""
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def token(settings):
    settings.OMNI_METRICS_TOKEN = TOKEN
    return TOKEN


@pytest.mark.engine_agnostic
def test_without_a_token_setting_there_is_no_such_page(settings):
    settings.OMNI_METRICS_TOKEN = None
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer anything"}):
        response = Client().get("/metrics", **headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.engine_agnostic
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                                    "Bearer", TOKEN])
def test_a_missing_or_wrong_token_is_401(token, header):
    headers = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    response = Client().get("/metrics", **headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"omni_" not in response.content


@pytest.mark.engine_agnostic
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
@pytest.mark.parametrize("header", [None, f"Bearer {TOKEN}"])
def test_another_method_is_a_json_405_not_the_csrf_page(token, method, header):
    headers = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    client = Client(enforce_csrf_checks=True)  # as a browser or curl meets it: no CSRF token
    response = getattr(client, method)("/metrics", "{}", content_type="application/json", **headers)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": {"code": "method_not_allowed", "message": response.json()["error"]["message"]}}
    assert set(response["Allow"].split(", ")) == {"GET", "HEAD"}
    assert b"omni_" not in response.content


@pytest.mark.engine_agnostic
def test_it_serves_the_contracts_names_and_is_not_in_the_api_document(token):
    samples = scrape_sync()
    names = {name for name, _ in samples}
    for name in ("omni_cost_usd_total", "omni_turn_first_text_seconds_count", "omni_websockets_open",
                 "omni_processes_limit", "process_resident_memory_bytes"):
        assert name in names, name
    for state in ("running", "warm", "spare", "exiting"):
        assert ("omni_processes", frozenset({("state", state)})) in samples, state
    for kind in ("input", "output", "cache_read", "cache_write"):
        assert ("omni_tokens_total", frozenset({("kind", kind)})) in samples, kind
    for code in ("rate_limited", "budget_exceeded", "thread_busy", "server_busy"):
        assert ("omni_turns_refused_total", frozenset({("code", code)})) in samples, code
    # OpenMetrics for a scraper that asks for it
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}",
                            HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")
    assert "/metrics" not in Client().get("/api/openapi.json").json()["paths"]
    assert Client().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


body = turn_bodies("mona")


async def run(message, thread):
    turn = await start_turn(None, body(message, thread))
    return [event async for event in turn.listen()]


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
async def test_it_counts_a_turn_an_error_and_a_refusal(offline_chat, token):
    offline_chat.OMNI_SPARE_CLIENTS = 0  # no spare CLIs started in the background
    offline_chat.OMNI_TURNS_PER_MINUTE = 2
    before = await scrape()

    done = await run("Hello there", "metrics-1")  # a new thread: started cold (no spare)
    assert done[-1]["type"] == "done" and done[-1]["result"]["isError"] is False
    failed = await run("boom [fail]", "metrics-1")  # the thread's warm client; the model fails
    assert failed[-1]["type"] == "done" and failed[-1]["result"]["isError"] is True
    with pytest.raises(Exception) as refused:  # a third turn in the minute
        await start_turn(None, body("Again", "metrics-2"))
    assert refused.value.code == "rate_limited"

    after = await scrape()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("omni_turns_total", agent="smart", outcome="done") == 1
    assert delta("omni_turns_total", agent="smart", outcome="model_error") == 1
    assert delta("omni_turns_refused_total", code="rate_limited") == 1
    assert delta("omni_turn_first_text_seconds_count") >= 1
    assert delta("omni_turn_duration_seconds_count") == 2
    assert delta("omni_tokens_total", kind="input") > 0
    assert delta("omni_tokens_total", kind="output") > 0
    assert delta("omni_cost_usd_total") == pytest.approx(done[-1]["result"]["costUsd"]
                                                         + failed[-1]["result"]["costUsd"])
    assert delta("omni_cost_usd_total") > 0
    assert delta("omni_spare_misses_total") == 1
    assert delta("omni_warm_hits_total") == 1
    # the failed turn's client was not kept: nothing warm, nothing running
    assert value(after, "omni_processes", state="running") == 0
    assert value(after, "omni_processes_limit") == offline_chat.OMNI_MAX_PROCESSES


@pytest.mark.django_db(transaction=True)
async def test_it_counts_open_websockets(token, settings):
    settings.OMNI_SPARE_CLIENTS = 0
    before = value(await scrape(), "omni_websockets_open")
    comm = WebsocketCommunicator(application, "/ws/chat/")
    connected, _ = await comm.connect()
    assert connected
    assert value(await scrape(), "omni_websockets_open") == before + 1
    await comm.disconnect()
    assert value(await scrape(), "omni_websockets_open") == before


@pytest.mark.django_db
def test_it_counts_decisions_once_each(token):
    from chat_app.tools import Caller
    from sessions_app import toolcalls as calls
    from sessions_app.models import SessionMapping

    SessionMapping.objects.create(thread_id="m-approve", resource_id="mona", session_id="s-approve")
    caller = Caller("mona", "m-approve", "turn-1", "s-approve")
    before = scrape_sync()
    allowed = calls.open_approval_sync(caller, "s-approve", "tu-1", "delete_conversation", {})
    assert calls.decide_sync(allowed, "allow", "mona")
    assert not calls.decide_sync(allowed, "deny", "mona")  # decided already: not counted
    expiring = calls.open_approval_sync(caller, "s-approve", "tu-2", "delete_conversation", {})
    assert calls.decide_sync(expiring, "expired", "timeout")
    after = scrape_sync()
    for decision, n in (("allow", 1), ("deny", 0), ("expired", 1)):
        assert (value(after, "omni_approvals_total", decision=decision)
                - value(before, "omni_approvals_total", decision=decision)) == n, decision


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
async def test_a_queued_turns_wait_and_the_queue_depth_after_a_sweep(warm, token):
    from datetime import timedelta

    from asgiref.sync import sync_to_async

    from chat_app import queue
    from chat_app.models import QueuedMessage
    from chat_app.sdk import agent_preset
    from chat_app.turns import TurnSpec, queued, registry
    from tests.helpers import collect, wait_for_async

    # two messages wait on a thread nobody runs (their worker died): the sweep starts the first
    agent, preset = agent_preset(None)
    rows = [await sync_to_async(queued.insert_sync)(TurnSpec("mona", "m-queue", text, agent, preset),
                                                    "enqueue", "mona") for text in ("one", "two")]
    await sync_to_async(QueuedMessage.objects.filter(pk=rows[0].pk).update)(
        created_at=rows[0].created_at - timedelta(seconds=40))
    before = await scrape()

    started = await queue.sweep_and_count()
    assert [t.turn_id for t in started] == [rows[0].turn_id]
    swept = await scrape()
    assert value(swept, "omni_queue_depth") == 1  # the second still waits (the first is starting)
    assert value(swept, "omni_queue_wait_seconds_count") - value(before, "omni_queue_wait_seconds_count") == 1
    waited = value(swept, "omni_queue_wait_seconds_sum") - value(before, "omni_queue_wait_seconds_sum")
    assert 40 <= waited < 60
    assert value(swept, "omni_queue_wait_seconds_bucket", le="30.0") == value(
        before, "omni_queue_wait_seconds_bucket", le="30.0")

    await collect(started[0].listen())  # its end starts the next one on this worker
    await wait_for_async(lambda: registry.by_id(rows[1].turn_id) is not None)
    await collect(registry.by_id(rows[1].turn_id).listen())
    await queue.sweep_and_count()
    after = await scrape()
    assert value(after, "omni_queue_depth") == 0
    assert value(after, "omni_queue_wait_seconds_count") - value(before, "omni_queue_wait_seconds_count") == 2
