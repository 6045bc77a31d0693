"""Which CLI process a pooled client runs, and the pool letting go of it:
the real SDK and CLI in this process, against the offline model.

* the CLI's pid comes from the launcher's pid file, not the SDK's private
  state: warm reuse and the kill of a hung CLI still work when that state is
  gone (an SDK upgrade renaming it), and a missing pid file is a loud error;
* the pid files live in a private runtime directory of the server process
  that does not accumulate files;
* a spare whose CLI hangs at start is killed after ``OMNI_CLI_START_SECONDS``
  and its place freed;
* an idle warm client whose thread was deleted behind the pool's back
  (another server process, ``prune_sessions``) is closed within a janitor tick.
"""

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from chat_app import pool as pool_module
from chat_app import sdk
from chat_app.pool import client_pid, pool
from sessions_app.models import SessionMapping
from tests.e2e import ROOT, descendants, is_cli, processes_with_env
from tests.test_pool import alive, gone, text, turn
from tests.helpers import wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk, pytest.mark.engine_agnostic]

KEY = ("wes", "warm-1")


@pytest.fixture
def fresh_complaints(monkeypatch):
    """Errors logged once per process are logged again in this test."""
    monkeypatch.setattr(pool_module, "_complained", set())


def cli_pids() -> set[int]:
    """The CLI processes below this (test) process, seen by /proc alone."""
    return {p for p in descendants(os.getpid()) if is_cli(p)}


class RenamedTransport:
    """The SDK's transport after an upgrade that renamed its private state:
    everything the SDK does with it still works, ``_process`` is gone."""

    HIDDEN = ("_process",)

    def __init__(self, inner):
        self.__dict__["_inner"] = inner

    def __getattr__(self, name):
        if name in self.HIDDEN:
            raise AttributeError(name)
        return getattr(self.__dict__["_inner"], name)


def hide_private_state(client) -> None:
    """Simulate the SDK upgrade on a connected client, and forget what the
    pool already knows of it: its pid must be found again from scratch."""
    client._transport = RenamedTransport(client._transport)
    assert not hasattr(client._transport, "_process")
    pool_module._pids.pop(client, None)


# --- the pid without the SDK's private state ------------------------------------------

async def test_warm_reuse_and_the_hung_cli_kill_need_no_private_sdk_state(warm, pool_log, fresh_complaints):
    first, pid = await turn("Remember the colour green")
    assert first[-1]["type"] == "done"
    assert cli_pids() == {pid}, "client_pid named another process than the CLI"
    client = pool.idle[KEY].client
    hide_private_state(client)
    assert client_pid(client) == pid and pool.idle[KEY].pid == pid

    # the next turn is answered by the same, warm CLI
    second, pid2 = await turn("Which colour?")
    assert second[-1]["type"] == "done" and pid2 == pid
    assert text(second).endswith('Earlier questions: "Remember the colour green".')
    assert f"[POOL] Reusing warm client thread=warm-1 pid={pid}" in pool_log.text

    # a hung CLI (stopped: it ignores stdin's end and SIGTERM) is killed at once;
    # without the SIGKILL the SDK would wait 5 s, SIGTERM, wait 5 s more
    hide_private_state(client)
    warm_client = pool.idle.pop(KEY)
    assert warm_client.client is client
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.wait_for(pool.close(client, kill=True), timeout=4)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert await gone(pid, timeout=1), "the hung CLI was not killed"
    assert client_pid(client) is None
    assert "[POOL] no pid file" not in pool_log.text and not [
        r for r in pool_log.records if r.levelno >= logging.ERROR]


async def test_a_client_whose_cli_cannot_be_found_is_a_loud_error_not_a_warm_client(
        warm, pool_log, fresh_complaints):
    """An SDK that stopped running the launcher (no pid file): every such client
    is closed as gone (never kept blind), and an error says why, once."""
    _, pid = await turn("one")
    client = pool.idle[KEY].client
    pidfile = sdk.cli_pidfile(client.options)
    assert pidfile.read_text().split()[0] == str(pid)
    pidfile.unlink()
    pool_module._pids.pop(client, None)
    events, pid2 = await turn("two")
    assert events[-1]["type"] == "done" and pid2 != pid, "the client without a pid file was reused"
    assert await gone(pid)
    errors = [r.getMessage() for r in pool_log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"no pid file {pidfile}" in errors[0], errors
    assert "Closing client thread=warm-1 pid=None: process gone" in pool_log.text


def test_options_name_a_pid_file_of_their_own_in_a_private_runtime_dir(warm):
    from chat_app.sdk import build_options

    runtime = sdk.runtime_dir()
    info = os.lstat(runtime)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    assert stat.S_IMODE(os.lstat(runtime.parent).st_mode) == 0o700
    assert ROOT not in runtime.parents, "the runtime dir is in the project"
    one = sdk.cli_pidfile(build_options(warm.OMNI_AGENTS["smart"]))
    two = sdk.cli_pidfile(build_options(warm.OMNI_AGENTS["smart"]))
    assert one.parent == two.parent == runtime and one != two


async def test_pid_files_are_removed_with_their_clients(warm):
    warm.OMNI_SPARE_CLIENTS = 1
    runtime = sdk.runtime_dir()
    before = set(runtime.iterdir())
    _, pid_a = await turn("a", thread="files-a")
    _, pid_b = await turn("b", thread="files-b")
    await turn("b again", thread="files-b")
    # the spares started after the first turn (one per agent, within the budget of 4)
    await asyncio.wait_for(asyncio.shield(pool._filling), timeout=30)
    spares = [s for agent in pool.spares.values() for s in agent]
    live = {sdk.cli_pidfile(w.client.options) for w in [*pool.idle.values(), *spares]}
    assert len(live) == 4 and set(runtime.iterdir()) - before == live
    await pool.shutdown()
    assert set(runtime.iterdir()) == before, "a closed client left its pid file"
    assert await gone(pid_a) and await gone(pid_b)


def test_a_dead_server_processs_runtime_dir_is_removed_by_the_next(tmp_path):
    """A server process killed with SIGKILL cannot remove its directory; the
    next one to start removes it, and its own goes when it exits."""
    code = (
        "import os, signal, sys, django; django.setup();"
        "from chat_app.sdk import runtime_dir; print(runtime_dir(), flush=True);"
        "sys.argv[1:] and os.kill(os.getpid(), signal.SIGKILL)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "omni.settings", "OMNI_DATA_DIR": str(tmp_path)}

    def server_process(*args: str) -> Path:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        return Path(done.stdout.strip())

    killed = server_process("kill")
    assert killed.is_dir(), "the killed process's directory should still be there"
    (killed / "some-client").write_text("1 1\n")
    exited = server_process()
    assert exited.parent == killed.parent
    assert not killed.exists(), "the next server process did not remove a dead one's directory"
    assert not exited.exists(), "a process that exited left its directory"


# --- a spare whose CLI hangs at start ------------------------------------------------------

@pytest.fixture
def hanging_cli(warm, tmp_path):
    """The "real CLI" the launcher execs: a script that never answers."""
    script = tmp_path / "hanging-claude"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    warm.OMNI_CLI_PATH = str(script)
    sdk.real_cli_path.cache_clear()
    yield script
    sdk.real_cli_path.cache_clear()


async def test_a_spare_whose_cli_hangs_at_start_is_killed_and_its_slot_freed(warm, hanging_cli, pool_log):
    warm.OMNI_SPARE_CLIENTS = 1
    warm.OMNI_CLI_START_SECONDS = 1.0
    config_dir = str(warm.CLAUDE_CONFIG_DIR)
    pool.fill_spares()
    hung = await wait_for_async(lambda: processes_with_env("CLAUDE_CONFIG_DIR", config_dir), timeout=10,
                                interval=0.02, message="the hanging CLI started")
    assert len(hung) == 1, hung
    assert pool.starting == 1 and pool.counts()["spare"] == 1
    await asyncio.wait_for(asyncio.shield(pool._filling), timeout=15)
    assert pool.starting == 0 and pool.live == 0 and pool.spares.get("smart", []) == []
    assert pool.counts() == {"running": 0, "warm": 0, "spare": 0, "exiting": 0, "budget": 4}
    assert await gone(hung[0], timeout=5), "the hung CLI outlived its start's timeout"
    assert processes_with_env("CLAUDE_CONFIG_DIR", config_dir) == []
    assert f"did not start within 1.0s: killing its CLI pid={hung[0]}" in pool_log.text
    assert not [p for p in sdk.runtime_dir().iterdir() if p.read_text().split()[:1] == [str(hung[0])]]
    # filling stopped for now: no second start was tried
    assert pool_log.text.count("did not start within") == 1


# --- a thread deleted behind the pool's back -------------------------------------------------

async def test_an_idle_client_of_a_thread_deleted_elsewhere_is_closed_within_a_tick(
        warm, monkeypatch, pool_log):
    monkeypatch.setattr(pool_module, "MAPPING_CHECK_SECONDS", 0.3)
    _, pid_gone = await turn("secret plans", thread="deleted-elsewhere")
    _, pid_kept = await turn("other plans", thread="still-here")
    assert alive(pid_gone) and alive(pid_kept)

    def delete_behind_the_pools_back():  # another thread, no signal: as another process would
        SessionMapping.objects.filter(resource_id="wes", thread_id="deleted-elsewhere").delete()

    await sync_to_async(delete_behind_the_pools_back, thread_sensitive=False)()
    assert await gone(pid_gone, timeout=5), "the deleted thread's warm client kept its CLI"
    assert ("wes", "deleted-elsewhere") not in pool.idle
    assert "Closing client thread=deleted-elsewhere" in pool_log.text and "thread deleted" in pool_log.text
    # The behaviour under test is that nothing happens: a few more ticks (MAPPING_CHECK_SECONDS,
    # 0.3 s; the close above shows they run) and the other thread's client stays, and stays warm.
    await asyncio.sleep(1)
    assert alive(pid_kept) and list(pool.idle) == [("wes", "still-here")]
    events, pid = await turn("and now?", thread="still-here")
    assert pid == pid_kept and events[-1]["type"] == "done"
    # the deleted thread starts anew
    events, _ = await turn("Do you know my plans?", thread="deleted-elsewhere")
    assert events[0]["resumed"] is False and text(events).endswith("Earlier questions: none.")


async def test_a_thread_deleted_and_started_anew_elsewhere_drops_the_old_client(warm, monkeypatch):
    monkeypatch.setattr(pool_module, "MAPPING_CHECK_SECONDS", 0.3)
    _, pid = await turn("old conversation", thread="renewed")
    await SessionMapping.objects.filter(thread_id="renewed").aupdate(session_id="another-session")
    assert await gone(pid, timeout=5), "a client of the thread's old session stayed warm"
    assert pool.counts()["warm"] == 0
