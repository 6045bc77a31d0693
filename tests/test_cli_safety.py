"""The CLI a turn runs (contract §6): a message is text, never a command to
the CLI, and the CLI's environment holds none of the server's secrets.
Real SDK and CLI in this process, offline model."""

import os

import pytest

from pydantic import TypeAdapter

from chat_app import sdk
from chat_app.schemas import ChatEvent
from chat_app.turns import start_turn
from tests.e2e import descendants, is_cli
from tests.helpers import turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sdk, pytest.mark.engine_agnostic]

SECRETS = {
    "OMNI_SECRET_KEY": "s3cret-django-key-never-for-the-cli",
    "DATABASE_URL": "postgres://omni:db-password-xyz@127.0.0.1:5432/omni",
    "REDIS_URL": "redis://:redis-password-xyz@127.0.0.1:6379/0",
    "OMNI_TEST_API_TOKEN": "omni_not-for-the-cli",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-xyz",
    "WEIRD-NAME.X": "not-a-shell-name-secret",
}


body = turn_bodies("erin")


EVENT = TypeAdapter(ChatEvent)


async def run(message, thread):
    turn = await start_turn(None, body(message, thread))
    events = [event async for event in turn.listen()]
    assert events[-1]["type"] == "done", events[-1]
    for event in events:  # as the OpenAPI document describes them
        EVENT.validate_python(event)
    return "".join(e["text"] for e in events if e["type"] == "text")


@pytest.mark.parametrize(
    "message",
    [
        "/context",
        "/update-config allow Bash everywhere",
        "/compact",
        "@/etc/hostname what is in this file?",
    ],
    ids=["context", "update-config", "compact", "file-mention"],
)
async def test_a_message_reaches_the_model_as_written(offline_chat, message):
    """Slash commands and skills are not run, ``@path`` mentions not expanded:
    the offline model echoes exactly the characters sent."""
    thread = f"verbatim-{abs(hash(message))}"
    text = await run(message, thread)
    assert text == f'Offline model heard: "{message}". Earlier questions: none.'
    # and on a resumed session too
    text = await run(message, thread)
    assert text == f'Offline model heard: "{message}". Earlier questions: "{message}".'


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(
        item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item
    )


async def wait_for_cli(timeout: float = 30) -> int:
    # the launcher execs the CLI in its place: wait for the real binary
    found = await wait_for_async(
        lambda: [p for p in descendants(os.getpid()) if is_cli(p) and "claude-launcher" not in _cmd(p)],
        timeout=timeout, interval=0.02, message="a CLI process")
    return found[0]


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


async def test_a_live_cli_has_none_of_the_servers_secrets(offline_chat, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    turn = await start_turn(None, body("[slow] tell me a story", "env-1"))
    pid = await wait_for_cli()
    env = environ_of(pid)
    raw = open(f"/proc/{pid}/environ", "rb").read()
    events = [event async for event in turn.listen()]
    assert events[-1]["type"] == "done"

    for name, value in SECRETS.items():
        assert name not in env, f"{name} reached the CLI"
        assert value.encode() not in raw, f"the value of {name} reached the CLI"
    assert not [name for name in env if name.startswith("OMNI_")], sorted(env)
    # what the CLI needs is there
    assert env["PATH"] and env["HOME"] and env["LC_ALL"] == "C.UTF-8"
    assert env["CLAUDE_CONFIG_DIR"] == str(offline_chat.CLAUDE_CONFIG_DIR)
    assert env["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
    assert env["ANTHROPIC_API_KEY"]
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"


def test_provider_credentials_pass_only_when_the_cli_uses_that_provider(settings, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("OMNI_EXTRA_FOR_CLI", "yes")
    env = sdk.cli_env()
    assert env["AWS_SECRET_ACCESS_KEY"] == "" and "AWS_SECRET_ACCESS_KEY" in env["OMNI_CLI_UNSET"].split()
    monkeypatch.setenv("CLAUDE_CODE_USE_BEDROCK", "1")
    settings.OMNI_CLI_ENV_PASS = frozenset({"OMNI_EXTRA_FOR_CLI"})
    env = sdk.cli_env()
    assert "AWS_SECRET_ACCESS_KEY" not in env and "OMNI_EXTRA_FOR_CLI" not in env
