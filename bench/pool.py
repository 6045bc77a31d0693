"""Warm Claude processes, measured as a client sees them, in one run.

Starts live daphne servers with the offline model (exactly as an operator
does: ``migrate``, then ``daphne omni.asgi:application``) and measures time
to the first ``text`` event through the websocket:

* baselines, straight on the SDK: a new CLI process per message
  (``query()`` with ``resume``, the seed's way), one ``ClaudeSDKClient``
  kept across messages, a connected client's first message (the best a
  spare can do), and 16 warm clients answering at once (the best 16
  conversations can do on this machine's cores);
* the project, defaults (spares on): a new thread's first turn on a spare,
  warm follow-ups; each sample right after its raw baseline's (a raw
  client's first message, a raw warm client's next one), so that on a
  shared machine whose speed drifts each pair sees the same minute;
* the project with no spares and no warm clients: a first turn that starts
  its CLI, and a follow-up after eviction (a cold resume from the store);
* 16 conversations at once, 4 turns each: p50/p95 to first text of first
  turns and follow-ups, wall time, peak RSS of daphne with its CLI children;
  once with every follow-up at the same moment (the worst case), once with
  a person's pause (1-3 s) before each, the raw clients the same way;
* a burst of 60 new conversations at once with the default budget: how many
  were served, refused with ``server_busy``, failed otherwise; peak RSS; and
  whether the server still answers afterwards.

The offline model runs in a process of its own (``python -m
chat_app.offline_model``), shared by the baselines and the servers (started
with ``OMNI_OFFLINE_MODEL=0`` and ``ANTHROPIC_BASE_URL`` pointing at it): a
model is always another process, and inside daphne its threads would take
the server's CPU and GIL and be counted as the server's time.

Writes ``bench/results/pool.md`` and ``bench/results/pool.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, query

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = 15
FIRSTS = 9  # first messages (raw) and new threads on a spare
CONCURRENT, TURNS = 16, 4
PAUSE = (1.0, 3.0)  # seconds a person takes to read a reply and send the next message
BURST = 60


def _ms(seconds: float) -> float:
    return seconds * 1000


def pause(conversation: int, turn: int, paused: bool) -> float:
    """Seconds conversation ``conversation`` waits before follow-up ``turn``:
    none (every follow-up at the same moment, the worst case) or a person's
    pause, the same for the raw clients and the project."""
    return random.Random(conversation * 100 + turn).uniform(*PAUSE) if paused else 0.0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# --- baselines: the SDK alone ----------------------------------------------------

def _first_text(message) -> bool:
    event = getattr(message, "event", None)
    return isinstance(event, dict) and event.get("type") == "content_block_delta"


def raw_options(model_url: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="omni-bench-raw-"))
    return dict(
        env={"ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": "offline",
             "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CONFIG_DIR": str(work / "claude")},
        cwd=str(work), tools=[], setting_sources=[], include_partial_messages=True,
        system_prompt="You are a benchmark.",
    )


async def raw_turn(client: ClaudeSDKClient, message: str) -> float:
    """One message to a connected client: ms to its first text."""
    started, first = time.perf_counter(), None
    await client.query(message)
    async for reply in client.receive_response():
        if first is None and _first_text(reply):
            first = time.perf_counter() - started
    return _ms(first)


async def raw_spawn(options: dict) -> list[float]:
    """A new CLI process per message, resuming the session (the seed's way)."""
    spawn, session = [], None
    for i in range(SAMPLES // 3 + 1):  # slow: fewer samples
        started, first = time.perf_counter(), None
        async for message in query(prompt=f"spawn {i}", options=ClaudeAgentOptions(resume=session, **options)):
            if first is None and _first_text(message):
                first = time.perf_counter() - started
            session = getattr(message, "session_id", None) or session
        if i:  # the first one creates the session: not a resume
            spawn.append(_ms(first))
    return spawn


async def raw_fresh(options: dict, i: int) -> float:
    """A connected, idle client's first message: what a spare can do at best."""
    client = ClaudeSDKClient(ClaudeAgentOptions(**options))
    await client.connect()
    try:
        await asyncio.sleep(1)
        return await raw_turn(client, f"fresh {i}")
    finally:
        await client.disconnect()


async def raw_concurrent(options: dict, count: int, turns: int, paused: bool = False) -> list[float]:
    """``count`` warm clients, as :func:`conversations` drives the project:
    first turns together, then each client's follow-ups, all at once (or
    each after a person's pause)."""
    opened = asyncio.Barrier(count)

    async def one(i):
        client = ClaudeSDKClient(ClaudeAgentOptions(**options))
        await client.connect()
        try:
            out = []
            for t in range(turns):
                await asyncio.sleep(pause(i, t, paused and t > 0))
                started, first = time.perf_counter(), None
                await client.query(f"conversation {i} turn {t}")
                async for message in client.receive_response():
                    if first is None and _first_text(message):
                        first = time.perf_counter() - started
                if t == 0:
                    await opened.wait()
                else:
                    out.append(_ms(first))
            return out
        finally:
            await client.disconnect()

    return [ms for out in await asyncio.gather(*(one(i) for i in range(count))) for ms in out]


# --- the project through its websocket ----------------------------------------------

class Peak:
    """Peak RSS of a process and all its descendants, and peak count of the
    CLI processes it started (its children; not the CLIs' own helper
    processes), sampled every 0.25 s. ``clis_only``: only those CLIs and
    their descendants (a raw SDK run: the bench process itself, its model
    and servers are not counted). The raw runs at once are sampled too, so
    both sides of a ratio carry the same sampling cost."""

    def __init__(self, pid: int, *, clis_only: bool = False, interval: float = 0.25):
        self.pid, self.clis_only, self.interval = pid, clis_only, interval
        self.peak_mb, self.peak_cli = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cli: dict[int, bool] = {}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _is_cli(self, pid: int) -> bool:
        from tests.e2e import is_cli

        if pid not in self._cli:
            self._cli[pid] = is_cli(pid)
        return self._cli[pid]

    def _run(self):
        from chat_app.pool import rss_mb
        from tests.e2e import _ppid, descendants

        while not self._stop.is_set():
            below = descendants(self.pid)
            clis = [p for p in below if _ppid(p) == self.pid and self._is_cli(p)]
            if self.clis_only:
                pids = [*clis, *(d for p in clis for d in descendants(p))]
            else:
                pids = [self.pid, *below]
            self.peak_mb = max(self.peak_mb, sum(rss_mb(p) for p in pids))
            self.peak_cli = max(self.peak_cli, len(clis))
            self._stop.wait(self.interval)


async def ws_turn(ws, thread: str, resource: str, message: str) -> tuple[str, float | None]:
    """One turn over an open websocket: (last event's type or error code, ms to first text)."""
    started, first = time.perf_counter(), None
    # chunks: false, as the page sends: it reads none of the raw SDK messages
    await ws.send_json({"type": "message", "message": message, "threadId": thread, "resourceId": resource,
                        "chunks": False})
    while True:
        event = json.loads((await ws.receive(timeout=120)).data)
        if event["type"] == "text" and first is None:
            first = _ms(time.perf_counter() - started)
        if event["type"] == "done":
            return "done", first
        if event["type"] == "error":
            return event["code"], first


async def connect(server):
    import aiohttp

    http = aiohttp.ClientSession()
    return http, await http.ws_connect(server.ws_url())


async def wait_spare(server, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count("[POOL] Spare client ready agent=smart") < count:
        if time.monotonic() > deadline:
            raise RuntimeError("no spare client became ready")
        await asyncio.sleep(0.05)


async def paired(server, options: dict) -> dict[str, list[float]]:
    """The project's spare and warm turns, each right after its raw
    baseline (a raw client's first message; a raw warm client's next
    message): on a shared machine whose speed drifts, each pair sees the
    same minute, so their ratio holds."""
    http, ws = await connect(server)
    raw = ClaudeSDKClient(ClaudeAgentOptions(**options))
    await raw.connect()
    try:
        fresh, spare, warm, follow = [], [], [], []
        for i in range(FIRSTS):
            fresh.append(await raw_fresh(options, i))
            await wait_spare(server, i + 1)
            thread = f"spare-{uuid.uuid4().hex[:8]}"
            spare.append((await ws_turn(ws, thread, "bench", "hello"))[1])
        # Follow-ups in the steady state, not beside the used spare's
        # replacement starting (a CLI's start takes a core for ~0.5 s).
        await wait_spare(server, FIRSTS + 1)
        await raw_turn(raw, "hello")  # its first message is not a warm one
        for i in range(SAMPLES):
            warm.append(await raw_turn(raw, f"warm {i}"))
            follow.append((await ws_turn(ws, thread, "bench", f"follow-up {i}"))[1])
        return {"fresh": fresh, "spare": spare, "warm": warm, "follow": follow}
    finally:
        await raw.disconnect()
        await ws.close()
        await http.close()


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def cpu_per_turn(server, turns: int = 100) -> dict:
    """daphne's CPU per warm follow-up over ``turns`` turns (the model in
    another process), next to its warm CLI's CPU per turn."""
    from tests.e2e import _ppid, descendants, is_cli

    http, ws = await connect(server)
    try:
        thread = f"cpu-{uuid.uuid4().hex[:8]}"
        await ws_turn(ws, thread, "cpu", "hello")
        await ws_turn(ws, thread, "cpu", "warm up")
        await asyncio.sleep(1)  # spares started meanwhile have settled
        clis = [p for p in descendants(server.proc.pid) if _ppid(p) == server.proc.pid and is_cli(p)]
        daphne0, cli0 = cpu_ms(server.proc.pid), {p: cpu_ms(p) for p in clis}
        for i in range(turns):
            status, _ = await ws_turn(ws, thread, "cpu", f"turn {i}")
            assert status == "done", status
        daphne = (cpu_ms(server.proc.pid) - daphne0) / turns
        cli = max(cpu_ms(p) - before for p, before in cli0.items() if Path(f"/proc/{p}").exists()) / turns
        return {"daphne": daphne, "cli": cli}
    finally:
        await ws.close()
        await http.close()


async def project_cold(server) -> dict[str, list[float]]:
    http, ws = await connect(server)
    try:
        first, cold = [], []
        for i in range(5):
            thread = f"cold-{uuid.uuid4().hex[:8]}"
            first.append((await ws_turn(ws, thread, "bench", "hello"))[1])
            cold.append((await ws_turn(ws, thread, "bench", "again"))[1])
        return {"first": first, "cold": cold}
    finally:
        await ws.close()
        await http.close()


async def conversations(server, count: int, turns: int, paused: bool = False) -> dict:
    """``count`` conversations at once: their first turns together, then,
    once every conversation has its CLI, their follow-ups together (so the
    follow-ups measure warm turns under concurrency, not the spawns of the
    other conversations' first turns), or with ``paused`` each follow-up
    after a person's pause of its own."""
    opened = asyncio.Barrier(count)

    async def one(i):
        http, ws = await connect(server)
        try:
            thread, out = f"conc-{i}-{uuid.uuid4().hex[:6]}", []
            for t in range(turns):
                await asyncio.sleep(pause(i, t, paused and t > 0))
                out.append(await ws_turn(ws, thread, f"user-{i}", f"turn {t}"))
                if t == 0:
                    await opened.wait()
            return out
        finally:
            await ws.close()
            await http.close()

    with Peak(server.proc.pid) as peak:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(count)))
        wall = time.perf_counter() - started
    firsts = [r[0][1] for r in results if r[0][0] == "done"]
    follows = [ms for r in results for status, ms in r[1:] if status == "done"]
    failed = sum(status != "done" for r in results for status, _ in r)
    return {"first": firsts, "follow": follows, "wall": wall, "peak_mb": peak.peak_mb,
            "peak_cli": peak.peak_cli, "failed": failed}


async def burst(server, count: int) -> dict:
    async def one(i):
        http, ws = await connect(server)
        try:
            return (await ws_turn(ws, f"burst-{i}-{uuid.uuid4().hex[:6]}", f"burst-{i}", "hello"))[0]
        finally:
            await ws.close()
            await http.close()

    with Peak(server.proc.pid) as peak:
        outcomes = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    codes = [o if isinstance(o, str) else type(o).__name__ for o in outcomes]
    status, _, _ = server.request("GET", "/api/sessions?resourceId=burst-0")
    http, ws = await connect(server)
    try:
        after = (await ws_turn(ws, "after-burst", "bench", "still there?"))[0]
    finally:
        await ws.close()
        await http.close()
    return {"served": codes.count("done"), "busy": codes.count("server_busy"),
            "other": len(codes) - codes.count("done") - codes.count("server_busy"),
            "codes": sorted(set(codes)), "peak_mb": peak.peak_mb, "peak_cli": peak.peak_cli,
            "after": after, "rest_status": status}


# --- the run -----------------------------------------------------------------------

class ModelProcess:
    """The offline model in a process of its own."""

    def __enter__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chat_app.offline_model", "--port", str(port)],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # "Offline model listening on ..."
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_server(name: str, model_url: str | None = None, **env: str):
    from tests.e2e import Server

    if model_url:
        env = {"OMNI_OFFLINE_MODEL": "0", "ANTHROPIC_BASE_URL": model_url,
               "ANTHROPIC_API_KEY": "offline-model", **env}
    server = Server(Path(tempfile.mkdtemp(prefix=f"omni-bench-{name}-")), os.environ.get("DATABASE_URL"),
                    {"OMNI_LOG_LEVEL": "INFO", **env})
    server.start()
    return server


async def measure() -> dict:
    with ModelProcess() as model:
        return await measure_with(model.base_url)


async def measure_with(model_url: str) -> dict:
    options = raw_options(model_url)
    out = {"raw": {"spawn": await raw_spawn(options)}}
    server = start_server("defaults", model_url, OMNI_SPARE_CLIENTS="1")
    try:
        out["defaults"] = await paired(server, options)
        out["raw"].update(warm=out["defaults"]["warm"], fresh=out["defaults"]["fresh"])
        # The raw floor of 16 at once right before the project's (the server
        # idle meanwhile), so both see the machine in the same state.
        with Peak(os.getpid(), clis_only=True) as raw_peak:
            out["raw"]["concurrent"] = await raw_concurrent(options, CONCURRENT, TURNS)
        out["raw"]["concurrent_peak_mb"] = raw_peak.peak_mb
        out["concurrent"] = await conversations(server, CONCURRENT, TURNS)
        with Peak(os.getpid(), clis_only=True):
            out["raw"]["paused"] = await raw_concurrent(options, CONCURRENT, TURNS, paused=True)
        out["paused"] = await conversations(server, CONCURRENT, TURNS, paused=True)
    finally:
        server.stop()
    # Warm turns only: a server of its own (none of the 16 conversations'
    # CLIs around), whose client is not recycled (OMNI_WARM_MAX_TURNS, 100
    # by default) within the 100 turns counted.
    server = start_server("cpu", model_url, OMNI_SPARE_CLIENTS="1", OMNI_WARM_MAX_TURNS="1000")
    try:
        out["cpu"] = await cpu_per_turn(server)
    finally:
        server.stop()
    server = start_server("cold", model_url, OMNI_SPARE_CLIENTS="0", OMNI_WARM_CLIENTS="0")
    try:
        out["cold"] = await project_cold(server)
    finally:
        server.stop()
    server = start_server("burst", model_url, OMNI_SPARE_CLIENTS="1")
    try:
        out["budget"] = int(server.env().get("OMNI_MAX_PROCESSES") or 24)
        out["burst"] = await burst(server, BURST)
    finally:
        server.stop()
    return out


def rows_of(m: dict) -> list[tuple[str, float, str]]:
    p50 = statistics.median
    raw_warm, raw_spawn = p50(m["raw"]["warm"]), p50(m["raw"]["spawn"])
    follow = p50(m["defaults"]["follow"])
    conc, b = m["concurrent"], m["burst"]
    return [
        ("raw SDK: new process per message (resume), to first text p50", raw_spawn, "ms"),
        ("raw SDK: warm ClaudeSDKClient, to first text p50", raw_warm, "ms"),
        ("raw SDK: a connected client's first message, to first text p50", p50(m["raw"]["fresh"]), "ms"),
        ("project: new thread on a spare, to first text p50", p50(m["defaults"]["spare"]), "ms"),
        ("project: new thread without a spare, to first text p50", p50(m["cold"]["first"]), "ms"),
        ("project: follow-up (warm), to first text p50", follow, "ms"),
        ("project: follow-up after eviction (cold resume), p50", p50(m["cold"]["cold"]), "ms"),
        ("follow-up warm vs raw warm", follow / raw_warm, "x"),
        ("raw spawn-per-message vs follow-up warm", raw_spawn / follow, "x faster"),
        (f"{CONCURRENT} conversations x {TURNS}: first turn p50", p50(conc["first"]), "ms"),
        (f"{CONCURRENT} conversations x {TURNS}: follow-up p50", p50(conc["follow"]), "ms"),
        (f"raw SDK: {CONCURRENT} warm clients x {TURNS} at once, follow-up p50",
         p50(m["raw"]["concurrent"]), "ms"),
        (f"{CONCURRENT} conversations x {TURNS}: follow-up p95", pct(conc["follow"], 0.95), "ms"),
        (f"raw SDK: {CONCURRENT} warm clients x {TURNS}, {PAUSE[0]:g}-{PAUSE[1]:g} s pause before each "
         "follow-up, follow-up p50", p50(m["raw"]["paused"]), "ms"),
        (f"{CONCURRENT} conversations x {TURNS}, {PAUSE[0]:g}-{PAUSE[1]:g} s pause before each follow-up: "
         "follow-up p50", p50(m["paused"]["follow"]), "ms"),
        (f"{CONCURRENT} conversations x {TURNS}, {PAUSE[0]:g}-{PAUSE[1]:g} s pause before each follow-up: "
         "follow-up p95", pct(m["paused"]["follow"], 0.95), "ms"),
        (f"{CONCURRENT} conversations x {TURNS}: wall time", conc["wall"], "s"),
        (f"{CONCURRENT} conversations x {TURNS}: peak RSS, daphne + CLIs", conc["peak_mb"], "MB"),
        (f"{CONCURRENT} conversations x {TURNS}: peak CLI processes", conc["peak_cli"], "processes"),
        (f"{CONCURRENT} conversations x {TURNS}: failed turns (both runs)",
         conc["failed"] + m["paused"]["failed"], "turns"),
        (f"burst of {BURST} new conversations: served", b["served"], "conversations"),
        (f"burst of {BURST} new conversations: server_busy", b["busy"], "conversations"),
        (f"burst of {BURST} new conversations: other errors", b["other"], "conversations"),
        (f"burst of {BURST} new conversations: peak RSS, daphne + CLIs", b["peak_mb"], "MB"),
        (f"burst of {BURST} new conversations: peak CLI processes (budget {m['budget']})",
         b["peak_cli"], "processes"),
        ("after the burst: a new turn", 1.0 if b["after"] == "done" else 0.0, "1 = done"),
        ("daphne's CPU per warm follow-up (100 turns, the model in another process)", m["cpu"]["daphne"], "ms"),
        ("the warm CLI's CPU per follow-up (same turns)", m["cpu"]["cli"], "ms"),
        ("spare vs a raw client's first message", p50(m["defaults"]["spare"]) / p50(m["raw"]["fresh"]), "x"),
        (f"{CONCURRENT} at once: project vs raw, follow-up p50",
         p50(conc["follow"]) / p50(m["raw"]["concurrent"]), "x"),
        (f"raw SDK: {CONCURRENT} warm clients x {TURNS} at once: peak RSS of their CLIs",
         m["raw"]["concurrent_peak_mb"], "MB"),
    ]


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def write_results(m: dict, rows) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = [f"# Warm sessions benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}. Offline model, websocket client, `python -m bench pool`.", "",
             "| measure | value | unit |", "| --- | ---: | --- |"]
    for name, value, unit in rows:
        lines.append(f"| {name} | {value:,.1f} | {unit} |")
    (RESULTS / "pool.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the chart needs bench/requirements.txt
        return
    labels = ["raw: process\nper message", "raw: warm\nclient", "raw: a client's\nfirst message",
              "new thread\n(spare)", "new thread\n(no spare)", "follow-up\n(warm)", "follow-up\n(cold)",
              f"raw: {CONCURRENT} warm\nclients at once", f"{CONCURRENT} at once:\nfollow-up p50",
              f"raw: {CONCURRENT} with\npauses", f"{CONCURRENT} with pauses:\nfollow-up p50"]
    values = [row[1] for row in rows[:7]] + [rows[11][1], rows[10][1], rows[13][1], rows[14][1]]
    fig, ax = plt.subplots(figsize=(12.5, 4.2))
    bars = ax.bar(labels, values, color=["#999", "#999", "#999", "#3a7", "#c84", "#3a7", "#c84", "#999", "#37a",
                                         "#999", "#37a"])
    ax.bar_label(bars, fmt="%.0f ms", fontsize=8)
    ax.set_ylabel("time to first text (ms)")
    ax.set_title(f"Time to first text, p50 ({machine()})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "pool.png", dpi=110)
    plt.close(fig)


def run():
    measured = asyncio.run(measure())
    rows = rows_of(measured)
    write_results(measured, rows)
    return rows
