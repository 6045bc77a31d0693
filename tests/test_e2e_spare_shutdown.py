"""A worker that served pages but never ran a turn still stops its spares.

Spares start when a chat client connects (the websocket consumer fills the
pool); the server's shutdown hook must not depend on a turn having run. A
live daphne server (real SDK, CLI and offline model): a websocket connects,
the pool reports a spare, no turn runs, SIGTERM: daphne exits in time, the
pool closed each spare itself (not the kernel's parent-death signal, which
only fires once daphne is gone) and no CLI process it started is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess

import pytest

from chat_app.sdk import runtime_dir
from tests.e2e import Server, WSClient, _is_zombie, cmdline, run_database, stop_server
from tests.helpers import wait_for_async

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]  # the pool's processes, not the database

EXIT_TIMEOUT = 20


def running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) and "claude" in cmdline(pid)


async def test_sigterm_stops_the_spares_of_a_worker_that_ran_no_turn(tmp_path):
    pg = run_database()
    server = Server(tmp_path / "server", pg.url if pg else None, {"OMNI_SPARE_CLIENTS": "1"})
    try:
        server.start()
        ws = await WSClient.connect(server)  # the page connects: spares start
        try:
            # every spare started (none still starting), each a CLI below daphne
            def all_ready():
                _, _, health = server.request("GET", "/api/health")
                ready = {int(m) for m in re.findall(r"\[POOL\] Spare client ready agent=\S+ pid=(\d+)",
                                                     server.log())}
                if ready and health["processes"]["spare"] == len(ready) \
                        and set(server.cli_children()) == ready:
                    return health, ready
                return None

            health, ready = await wait_for_async(all_ready, timeout=90, interval=0.1,
                                                 message=lambda: f"every spare ready:\n{server.log()[-3000:]}")
            assert health["processes"]["running"] == health["processes"]["warm"] == 0
            assert "Saved session mapping" not in server.log(), "a turn ran"
            cli = ready
            # the server's private directory of its CLIs' pid files (chat_app/sdk.py)
            runtime = list(runtime_dir().parent.glob(f"{server.proc.pid}-*"))
            assert len(runtime) == 1 and len(list(runtime[0].iterdir())) == len(cli), runtime

            proc, server.proc = server.proc, None
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
                raise AssertionError(
                    f"daphne did not exit within {EXIT_TIMEOUT}s of SIGTERM:\n{server.log()[-4000:]}")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout=5)

        left = [pid for pid in cli if running(pid)] + server.leftover_cli()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"CLI processes outlived the server: {sorted(set(left))}"
        log = server.log()
        closed = [pid for pid in cli if f"pid={pid}: shutdown" in log]
        assert sorted(closed) == sorted(cli), (
            f"the pool did not close the spares at shutdown (closed {closed} of {sorted(cli)}):\n{log[-4000:]}")
        assert not runtime[0].exists(), "the server left its runtime directory behind"
    finally:
        stop_server(server, pg)
