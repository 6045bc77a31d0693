"""Building ``ClaudeAgentOptions`` for a turn: agent preset, environment and
working directory. The only module that knows how the CLI is configured."""

import os
import threading
from pathlib import Path

from claude_agent_sdk import ClaudeAgentOptions
from django.conf import settings

from sessions_app.errors import BadRequest

_offline_lock = threading.Lock()
_offline_model = None


def agent_preset(name: str | None) -> tuple[str, dict]:
    name = name or settings.OMNI_DEFAULT_AGENT
    preset = settings.OMNI_AGENTS.get(name)
    if preset is None:
        raise BadRequest(
            f"unknown agent {name!r}; expected one of {sorted(settings.OMNI_AGENTS)}",
            code="unknown_agent",
        )
    return name, preset


def offline_model_url() -> str:
    """Start the project's offline model once per process (``OMNI_OFFLINE_MODEL=1``)."""
    global _offline_model
    with _offline_lock:
        if _offline_model is None:
            from chat_app.offline_model import start_offline_model

            _offline_model = start_offline_model()
        return _offline_model.base_url


def cli_env() -> dict[str, str]:
    """What the CLI gets on top of the server's environment (which carries
    ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL`` through unchanged)."""
    env = {
        "CLAUDE_CONFIG_DIR": str(settings.CLAUDE_CONFIG_DIR),
        # A server's CLI talks to the model endpoint and nothing else.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # A person is waiting: give up on an unreachable model in seconds,
        # not after the CLI's default ten retries (minutes).
        "CLAUDE_CODE_MAX_RETRIES": str(settings.OMNI_MODEL_MAX_RETRIES),
    }
    if settings.OMNI_OFFLINE_MODEL:
        env["ANTHROPIC_BASE_URL"] = offline_model_url()
        env["ANTHROPIC_API_KEY"] = os.environ.get("ANTHROPIC_API_KEY") or "offline-model"
    return env


def workspace_dir() -> Path:
    """The CLI's working directory, ``OMNI_WORKSPACE_DIR`` (default: under the
    data dir). Its path names the transcripts' project in the store."""
    path = Path(settings.OMNI_WORKSPACE_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_options(
    preset: dict,
    *,
    resume: str | None = None,
    fork: bool = False,
    resume_at: str | None = None,
    session_store=None,
) -> ClaudeAgentOptions:
    Path(settings.CLAUDE_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    return ClaudeAgentOptions(
        system_prompt=preset["system_prompt"],
        model=preset.get("model") or None,
        tools=list(preset.get("tools", [])),
        allowed_tools=list(preset.get("tools", [])),
        setting_sources=[],  # no user or project settings from the server's disk
        resume=resume,
        fork_session=fork,
        resume_session_at=resume_at,
        include_partial_messages=True,
        cwd=str(workspace_dir()),
        env=cli_env(),
        session_store=session_store,
    )
