"""``/api/health``'s checks cannot pile up (issue 14, item 6): one probe of
a dependency at a time, shared by every request meanwhile, its result
reused for a second, a hung one given up with a bound on the threads left
behind. The live server under a black-holed database: test_health_outage."""

import asyncio
import threading
import time

import pytest

from omni import health
from tests.conftest import _records_of
from tests.helpers import wait_for_async

pytestmark = pytest.mark.engine_agnostic


class Blocking:
    """A probe function that blocks until released, counting its calls."""

    def __init__(self, result="ok"):
        self.calls = 0
        self.release = threading.Event()
        self.result = result

    def __call__(self):
        self.calls += 1
        if not self.release.wait(10):
            raise TimeoutError("never released")
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


async def answers(probe, count, timeout=health.CHECK_SECONDS):
    async def one():
        try:
            return await probe.result(timeout)
        except Exception:
            return "error"
    return await asyncio.gather(*(one() for _ in range(count)))


async def test_concurrent_requests_share_one_probe():
    check = Blocking()
    probe = health.ThreadProbe("test", check)
    waiting = asyncio.ensure_future(answers(probe, 20))
    await wait_for_async(lambda: check.calls, timeout=10, message="the probe's thread started")
    assert check.calls == 1 and probe.threads() == 1
    check.release.set()
    assert await waiting == ["ok"] * 20
    assert check.calls == 1


async def test_a_recent_result_is_reused_then_probed_again(monkeypatch):
    monkeypatch.setattr(health, "FRESH_SECONDS", 0.3)
    check = Blocking()
    check.release.set()
    probe = health.ThreadProbe("test", check)
    assert await answers(probe, 3) == ["ok"] * 3
    assert await answers(probe, 3) == ["ok"] * 3
    assert check.calls == 1
    await asyncio.sleep(0.35)  # the behaviour under test: the result ages past FRESH_SECONDS
    assert await answers(probe, 1) == ["ok"]
    assert check.calls == 2


async def test_a_failed_probe_is_an_error_and_reused_too():
    check = Blocking(result=OSError("connection refused"))
    check.release.set()
    probe = health.ThreadProbe("test", check)
    assert await answers(probe, 5) == ["error"] * 5
    assert await answers(probe, 5) == ["error"] * 5
    assert check.calls == 1


async def test_a_hung_probe_answers_error_in_time_and_is_given_up_with_bounded_threads(monkeypatch):
    monkeypatch.setattr(health, "STALE_SECONDS", 0.5)
    check = Blocking()
    probe = health.ThreadProbe("test", check)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await answers(probe, 10, timeout=0.2) == ["error"] * 10
    assert loop.time() - started < 1  # expected 0.2 s (the requests' timeout); the probe hangs for 10 s
    assert check.calls == 1  # still the first one, in flight
    # Polled for a long time: a new probe after each stale period, but never
    # more than MAX_ABANDONED hung ones left behind plus the one in flight.
    for _ in range(12):
        await answers(probe, 2, timeout=0.1)
        await asyncio.sleep(0.1)  # polled over time: the probes go stale (the behaviour under test)
        assert probe.threads() <= health.MAX_ABANDONED + 1
    assert check.calls == health.MAX_ABANDONED + 1
    check.release.set()  # the database answers again: the hung probes end
    await wait_for_async(lambda: probe.threads() == 0, timeout=10, message="the hung probes' threads ended")
    await asyncio.sleep(0.6)  # the behaviour under test: past the stale in-flight probe, a fresh one
    assert await answers(probe, 1) == ["ok"]


async def test_the_channel_layer_probe_is_single_flight_too(monkeypatch):
    calls = []

    async def ping():
        calls.append(1)
        await asyncio.sleep(0.2)  # a slow channel layer (the behaviour under test)
        return "ok"

    probe = health.LoopProbe("test", ping)
    assert await asyncio.gather(*(probe.result() for _ in range(10))) == ["ok"] * 10
    assert await probe.result() == "ok"  # reused
    assert len(calls) == 1


async def test_a_hung_channel_layer_is_an_error_within_the_budget(monkeypatch):
    monkeypatch.setattr(health, "CHECK_SECONDS", 0.3)

    async def hang():
        await asyncio.sleep(30)  # a hung channel layer (the behaviour under test)

    probe = health.LoopProbe("test", hang)
    started = time.monotonic()
    assert await asyncio.gather(*(probe.result() for _ in range(5))) == ["error"] * 5
    assert time.monotonic() - started < 1  # expected CHECK_SECONDS (0.3 s); the channel layer hangs for 30 s


@pytest.fixture
def api_log(caplog):
    """Records of logger ``omni.api`` (which does not propagate to the root)."""
    yield from _records_of(caplog, "omni.api")


async def test_a_failing_check_is_logged_when_it_fails_and_when_it_passes_again(monkeypatch, api_log):
    """A balancer polling through an outage adds two lines to the log, not one per probe."""
    monkeypatch.setattr(health, "FRESH_SECONDS", 0)
    check = Blocking(result=OSError("connection refused"))
    check.release.set()
    probe = health.ThreadProbe("test", check)
    for _ in range(5):
        assert await answers(probe, 1) == ["error"]
    check.result = "ok"
    for _ in range(3):
        assert await answers(probe, 1) == ["ok"]
    assert check.calls == 8
    lines = [r.getMessage() for r in api_log.records if r.name == "omni.api"]
    assert lines == ["health: test check failed: connection refused", "health: test check passes again"]
