"""Prometheus metrics of this server process (contract §10), served at
``GET /metrics`` (``omni/metrics_view.py``) to ``OMNI_METRICS_TOKEN``.

One registry per worker process (:data:`REGISTRY`, this module's own, not
prometheus_client's global one): each daphne process counts its own turns
and serves its own figures; Prometheus scrapes every worker and sums them
(README: a scrape config for N workers). Counters start at zero when a
worker starts, which ``rate()``/``increase()`` handle.

The call sites are one line each and cost a dict lookup and an addition:

* :func:`turn_finished` once per turn, with the turn's usage record
  (``chat_app/turns/runner.py``): turns by agent and outcome, tokens, cost,
  time to first text, duration;
* :func:`refused` for a turn refused before it starts (``start.py``):
  ``rate_limited``, ``budget_exceeded``, ``thread_busy``, ``server_busy``...;
* :func:`checkout` for the process a turn got (``pool.py``): warm and spare
  hits and misses, :func:`evicted` for each client the pool closes;
* :func:`lease_lost`, :func:`websocket_opened`/:func:`websocket_closed`,
  :func:`approval_decided`.

What is a state rather than an event (live CLI processes by state, running
turns) is read when scraped, by a collector (:func:`watch`), never kept up
to date by hand. Label values are the project's own small sets (agents,
outcome and error codes, reasons): never a resource, thread or user.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("omni.metrics")

# No ``*_created`` series beside each counter (half the lines, nothing an
# operator reads; the process's start time is process_start_time_seconds).
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
# The process's own: RSS, CPU, open fds, start time; Python's GC and version.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
REFUSAL_CODES = ("rate_limited", "budget_exceeded", "thread_busy", "server_busy")
DECISIONS = ("allow", "deny", "expired")
_LABEL = re.compile(r"[a-z0-9_]{1,64}")

# --- turns (contract §10) ---------------------------------------------------------
TURNS = Counter("omni_turns", "Turns finished, by agent and outcome (done, interrupted, "
                "model_error, or the error code the turn ended with)",
                ["agent", "outcome"], registry=REGISTRY)
FIRST_TEXT = Histogram(
    "omni_turn_first_text_seconds", "From a turn's start to its first text event",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
DURATION = Histogram(
    "omni_turn_duration_seconds", "From a turn's start to its end (tool approvals included)",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)
TOKENS = Counter("omni_tokens", "Model tokens used by finished turns, by kind",
                 ["kind"], registry=REGISTRY)
COST = Counter("omni_cost_usd", "Model cost of finished turns, in US dollars", registry=REGISTRY)

# --- limits: turns refused before they start ----------------------------------------
REFUSED = Counter("omni_turns_refused", "Turns refused before they started, by error code",
                  ["code"], registry=REGISTRY)
LEASE_LOSSES = Counter("omni_lease_losses", "Running turns that lost their thread's lease "
                       "(lost: another worker took the thread; deleted: the thread was deleted)",
                       ["reason"], registry=REGISTRY)

# --- the process pool ------------------------------------------------------------------
WARM_HITS = Counter("omni_warm_hits", "Follow-up turns that ran on their thread's warm client",
                    registry=REGISTRY)
WARM_MISSES = Counter("omni_warm_misses", "Follow-up turns that had to start a CLI, by why "
                      "(absent: no warm client in this worker; stale, process_gone, agent_changed, "
                      "new_session: one was there but could not be used)",
                      ["reason"], registry=REGISTRY)
SPARE_HITS = Counter("omni_spare_hits", "New threads' first turns that ran on a spare client",
                     registry=REGISTRY)
SPARE_MISSES = Counter("omni_spare_misses", "New threads' first turns that had to start a CLI "
                       "(no spare ready)", registry=REGISTRY)
EVICTIONS = Counter("omni_evictions", "Clients the pool closed, by reason (budget, lru, idle, "
                    "recycled, process_gone, stale, ...)", ["reason"], registry=REGISTRY)

# --- a busy thread's queue (contract §12) ---------------------------------------------------
QUEUE_DEPTH = Gauge("omni_queue_depth", "Messages waiting in busy threads' queues, on every worker "
                    "(read from the database by this worker's queue sweep, every few seconds)",
                    registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "omni_queue_wait_seconds", "How long a queued message waited before its turn started",
    buckets=(0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)

# --- connections, approvals ---------------------------------------------------------------
_sockets: "weakref.WeakSet" = weakref.WeakSet()
WEBSOCKETS = Gauge("omni_websockets_open", "Websockets open on this worker", registry=REGISTRY)
WEBSOCKETS.set_function(lambda: len(_sockets))
APPROVALS = Counter("omni_approvals", "Tool-call decisions, by decision (allow, deny, expired)",
                    ["decision"], registry=REGISTRY)

for _kind in TOKEN_KINDS:  # every series there from the start: increase() sees the first one
    TOKENS.labels(_kind)
for _code in REFUSAL_CODES:
    REFUSED.labels(_code)
for _decision in DECISIONS:
    APPROVALS.labels(_decision)
for _reason in ("lost", "deleted"):
    LEASE_LOSSES.labels(_reason)
for _reason in ("absent", "stale", "process_gone"):
    WARM_MISSES.labels(_reason)
for _reason in ("budget", "lru", "idle"):
    EVICTIONS.labels(_reason)


def _label(value) -> str:
    """A label value from the project's own strings, never anything unbounded."""
    value = str(value or "").strip().lower().replace(" ", "_").replace("-", "_")
    return value if _LABEL.fullmatch(value) else "other"


# --- call sites ---------------------------------------------------------------------------
def turn_finished(record: dict) -> None:
    """A turn ended: its usage record (``chat_app/turns/runner.py``'s ``_record``)."""
    try:
        TURNS.labels(_label(record.get("agent")), _label(record.get("outcome"))).inc()
        if (first := record.get("first_text_ms")) is not None:
            FIRST_TEXT.observe(first / 1000)
        if (duration := record.get("duration_ms")) is not None:
            DURATION.observe(duration / 1000)
        for kind in TOKEN_KINDS:
            if n := record.get(f"{kind}_tokens") or 0:
                TOKENS.labels(kind).inc(n)
        if cost := record.get("cost_usd") or 0:
            COST.inc(cost)
    except Exception:  # metrics never break a turn
        log.warning("metrics: could not count a turn", exc_info=True)


def refused(code: str) -> None:
    REFUSED.labels(_label(code)).inc()


def queue_waited(seconds: float) -> None:
    QUEUE_WAIT.observe(max(0.0, seconds))


def queue_depth(depth: int) -> None:
    QUEUE_DEPTH.set(depth)


def checkout(kind: str, *, new_thread: bool = False, fork: bool = False,
             reason: str | None = None) -> None:
    """The pool gave a turn a process: ``warm``, ``spare`` or ``cold`` (start
    one). Forks (and continuations after a decision) start cold by design and
    count as neither hit nor miss. ``reason``: why a warm client there was
    not used."""
    if fork:
        return
    if kind == "warm":
        WARM_HITS.inc()
    elif kind == "spare":
        SPARE_HITS.inc()
    elif new_thread:
        SPARE_MISSES.inc()
    else:
        WARM_MISSES.labels(_label(reason) if reason else "absent").inc()


def evicted(reason: str) -> None:
    """The pool closed an idle, spare or finished client (``reason`` as it logs it)."""
    reason = str(reason)
    if reason.startswith("recycled"):  # "recycled after N turns", "recycled at N MB RSS"
        reason = "recycled_rss" if "RSS" in reason else "recycled_turns"
    EVICTIONS.labels(_label(reason)).inc()


def lease_lost(deleted: bool = False) -> None:
    LEASE_LOSSES.labels("deleted" if deleted else "lost").inc()


def websocket_opened(socket) -> None:
    _sockets.add(socket)


def websocket_closed(socket) -> None:
    _sockets.discard(socket)


def approval_decided(decision: str) -> None:
    APPROVALS.labels(_label(decision)).inc()


# --- state, read when scraped ----------------------------------------------------------------
class StateCollector:
    """``omni_processes{state}`` (live CLI processes: running, warm, spare,
    exiting), ``omni_processes_limit`` and the turns running here, read from
    ``source()`` at scrape time (on the event loop: the pool's own thread)."""

    def __init__(self):
        self.source: Callable[[], dict] | None = None

    def describe(self):
        return []  # only known once collected

    def collect(self):
        if self.source is None:
            return
        try:
            state = self.source()
        except Exception:
            log.warning("metrics: could not read the pool's state", exc_info=True)
            return
        processes = GaugeMetricFamily("omni_processes", "Live Claude CLI processes of this worker, "
                                      "by state", labels=["state"])
        for name in ("running", "warm", "spare", "exiting"):
            processes.add_metric([name], state.get(name, 0))
        yield processes
        if "budget" in state:
            yield GaugeMetricFamily("omni_processes_limit", "OMNI_MAX_PROCESSES: this worker's "
                                    "budget of live CLI processes", value=state["budget"])
        if "turns" in state:
            yield GaugeMetricFamily("omni_turns_running", "Turns running on this worker "
                                    "(waiting for a decision included)", value=state["turns"])
        if "waiting" in state:
            yield GaugeMetricFamily("omni_turns_waiting", "Turns waiting for a person's decision "
                                    "on a tool call (holding no process)", value=state["waiting"])
        if "draining" in state:
            yield GaugeMetricFamily("omni_draining", "1 while this worker is shutting down",
                                    value=int(bool(state["draining"])))


_state = StateCollector()
REGISTRY.register(_state)


def watch(source: Callable[[], dict]) -> None:
    """Where the state gauges come from (wired by the top layer, ``omni``)."""
    _state.source = source
