"""The CLI's working directory is one path on every worker (issue: a thread
that changed worker told the model each worker's paths).

The CLI tells the model its working directory, and when a resumed session
was last written from another directory it adds a system message
"Environment update - Primary working directory: <new> (was <old>)". The
default ``OMNI_WORKSPACE_DIR`` therefore does not depend on the worker's
data dir, and names nothing of the server."""

import json
import os
import subprocess

import pytest

from chat_app import sdk
from chat_app.pool import pool
from chat_app.turns import start_turn
from tests.e2e import ROOT, python_bin
from tests.helpers import events_of, turn_bodies, wait_for_async

body = turn_bodies("wendy", "moving-1")


def default_workspace(data_dir) -> str:
    """The working directory a worker with data dir ``data_dir`` uses when
    ``OMNI_WORKSPACE_DIR`` is not set (its settings, in a process of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMNI_WORKSPACE_DIR", "CLAUDE_CONFIG_DIR")}
    env.update(OMNI_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="omni.settings")
    code = "import django; django.setup(); from django.conf import settings; print(settings.OMNI_WORKSPACE_DIR)"
    done = subprocess.run([python_bin(), "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def system_texts(request: dict) -> list[str]:
    """The texts the CLI adds to a model request as system messages."""
    texts = []
    for message in request.get("messages", []):
        if message.get("role") != "system":
            continue
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [block.get("text", "") for block in content if isinstance(block, dict)]
    return texts


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
@pytest.mark.engine_agnostic  # the CLI's working directory (the store's engine is tested elsewhere)
async def test_a_thread_moving_to_another_worker_changes_nothing_the_model_sees(offline_chat, tmp_path):
    worker_a, worker_b = tmp_path / "worker-a", tmp_path / "worker-b"
    workspaces = [default_workspace(worker_a), default_workspace(worker_b)]
    assert workspaces[0] == workspaces[1]  # one path, whatever the data dir
    assert str(tmp_path) not in workspaces[0]

    # Turn 1 as worker A would run it, turn 2 resumed cold as worker B (its
    # own CLI config dir: the session comes from the database).
    offline_chat.OMNI_WORKSPACE_DIR = type(offline_chat.DATA_DIR)(workspaces[0])
    offline_chat.CLAUDE_CONFIG_DIR = worker_a / "claude"
    first = await events_of(await start_turn(None, body("What is 2+2?")))
    assert first[-1]["type"] == "done"
    pool.forget(("wendy", "moving-1"))  # no warm client: B has none either
    await wait_for_async(lambda: pool.live == 0)
    offline_chat.OMNI_WORKSPACE_DIR = type(offline_chat.DATA_DIR)(workspaces[1])
    offline_chat.CLAUDE_CONFIG_DIR = worker_b / "claude"
    model = sdk._offline_model
    sent_before = len(model.requests)
    second = await events_of(await start_turn(None, body("And before?")))
    assert second[0]["resumed"] is True and second[-1]["type"] == "done"

    requests = [r for r in model.requests[sent_before:] if r.get("stream")]
    assert requests, "the second turn asked the model nothing"
    seen = "\n".join(text for request in requests for text in system_texts(request))
    assert "Environment update" not in seen, seen
    # the working directory the model is told of names no data dir
    assert "Primary working directory" in seen and str(tmp_path) not in seen
    assert not any(str(path) in json.dumps(request) for request in requests
                   for path in (worker_a, worker_b, offline_chat.DATA_DIR))


@pytest.mark.engine_agnostic
def test_a_default_workspace_that_is_not_the_servers_own_fails_the_check(settings, tmp_path):
    """The default path sits in a directory every user may write to: a
    symlink (or another user's directory) there is refused before the
    server starts (``manage.py migrate``/``check``), never run in."""
    from chat_app.checks import omni_workspace

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = tmp_path / "omni-workspace"
    planted.symlink_to(elsewhere)
    settings.DEFAULT_WORKSPACE_DIR = settings.OMNI_WORKSPACE_DIR = planted
    [error] = omni_workspace(None)
    assert error.id == "omni.E001" and str(planted) in error.msg
    settings.OMNI_WORKSPACE_DIR = tmp_path / "configured"  # a configured path is made as given
    assert omni_workspace(None) == []
    assert (tmp_path / "configured").is_dir()
