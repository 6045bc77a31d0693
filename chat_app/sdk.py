"""Building ``ClaudeAgentOptions`` for a turn: agent preset, environment and
working directory. The only module that knows how the CLI is configured."""

import atexit
import functools
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import warnings
import uuid
from pathlib import Path

import claude_agent_sdk

from claude_agent_sdk import ClaudeAgentOptions
from django.conf import settings

from sessions_app.errors import BadRequest

# A preset's tools that need no decision are in allowed_tools on purpose: they
# run without the permission callback (which only answers for tools that wait
# for a person); the SDK's warning about that would fire on every connect.
warnings.filterwarnings("ignore", category=claude_agent_sdk.CanUseToolShadowedWarning)

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


# The server's variables the CLI may see (contract §6): the model endpoint and
# key, its own switches, and what any program needs to run. Everything else
# (OMNI_SECRET_KEY, DATABASE_URL, REDIS_URL, cloud credentials, ...) is removed.
CLI_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
    "TMPDIR", "TMP", "TEMP",
    # reaching the model endpoint through a proxy or a private CA
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
    "no_proxy", "all_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
})
CLI_ENV_PREFIXES = ("LC_", "ANTHROPIC_", "CLAUDE_", "DISABLE_")
# Cloud model providers, passed only when the CLI is switched to them.
CLI_PROVIDER_PREFIXES = {
    "CLAUDE_CODE_USE_BEDROCK": ("AWS_",),
    "CLAUDE_CODE_USE_VERTEX": ("GOOGLE_", "CLOUD_ML_", "VERTEX_"),
}
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LAUNCHER = Path(__file__).resolve().parent / "bin" / "claude-launcher"


def cli_may_see(name: str, environ) -> bool:
    if name in CLI_ENV_NAMES or name.startswith(CLI_ENV_PREFIXES):
        return True
    if name in settings.OMNI_CLI_ENV_PASS:
        return True
    return any(
        environ.get(switch, "").strip() not in ("", "0") and name.startswith(prefixes)
        for switch, prefixes in CLI_PROVIDER_PREFIXES.items()
    )


@functools.cache
def real_cli_path() -> str:
    """The CLI the SDK would run: ``OMNI_CLI_PATH``, else the SDK's bundled
    one, else ``claude`` on ``PATH``."""
    if configured := getattr(settings, "OMNI_CLI_PATH", None):
        return str(configured)
    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return str(bundled)
    return shutil.which("claude") or "claude"


# PR_SET_PDEATHSIG fires when the *thread* that forked the CLI exits, not
# the process: the SDK spawns the CLI on the event loop's thread (daphne's
# main thread), which lives as long as the server. Never start a CLI from a
# short-lived thread (e.g. inside async_to_sync): it would be killed with it.
@functools.cache
def setpriv_path() -> str:
    return shutil.which("setpriv") or ""


# --- the CLI's process id, without the SDK's private state ------------------------
# Each client's options carry a pid file path of its own (``OMNI_CLI_PIDFILE``,
# in this server process's private runtime directory); the launcher writes its
# pid (which the CLI keeps: it execs the CLI in its place) and its start time
# there before it execs the CLI, and removes the variable from the CLI's
# environment. chat_app/pool.py reads it (``client_pid``).
PIDFILE_ENV = "OMNI_CLI_PIDFILE"
_runtime_lock = threading.Lock()
_runtime: dict[int, Path] = {}  # os.getpid() -> its directory (a forked child makes its own)


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process, from ``/proc/<pid>/stat`` (fields
    3 and 22; the start time in clock ticks since boot names the process: a
    reused pid has another); None if there is no such process."""
    try:
        # after the name (field 2), which may hold anything
        fields = read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def read_proc(path: str, size: int = 16384) -> bytes:
    """A ``/proc`` file's bytes (raises OSError). ``os.read``, not ``open()``:
    the pool reads a CLI's on every checkout and checkin of a warm client."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def runtime_dir() -> Path:
    """This server process's private directory (mode 0700) for its CLIs' pid
    files: ``<XDG_RUNTIME_DIR or the temp dir>/omni-cli-<uid>/<pid>-<start
    time>``, never in the project. It is removed when the process exits, and
    a directory left by a process that did not exit cleanly (SIGKILL) is
    removed by the next server process of the same user to start, so none
    accumulate; the pool removes each pid file when it closes its client."""
    pid = os.getpid()
    with _runtime_lock:
        if (path := _runtime.get(pid)) is not None and path.is_dir():
            return path
        base = _private_dir(_runtime_base() / f"omni-cli-{os.getuid()}")
        for old in base.iterdir():  # directories of server processes that are gone
            owner, _, started = old.name.partition("-")
            if owner.isdigit() and started.isdigit() and int(owner) != pid:
                state = process_state(int(owner))
                if state is None or str(state[1]) != started:
                    shutil.rmtree(old, ignore_errors=True)
        state = process_state(pid)
        if state is None:
            raise RuntimeError("cannot read /proc/self/stat: the pool needs Linux's /proc")
        path = _private_dir(base / f"{pid}-{state[1]}")
        _runtime[pid] = path
        atexit.register(_remove_runtime_dir, pid, path)
        return path


def _runtime_base() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.getuid():
        return Path(xdg)
    return Path(tempfile.gettempdir())


def _private_dir(path: Path) -> Path:
    """``path`` as a directory of this user's only (created 0700); a symlink,
    a file or another user's directory there is an error
    (:class:`NotPrivate`), never used."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise NotPrivate(f"{path} is not a directory of this user: the server cannot use it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


class NotPrivate(RuntimeError):
    """A directory the server must own is a symlink, a file or another user's."""


def _remove_runtime_dir(pid: int, path: Path) -> None:
    if os.getpid() == pid:  # not from a forked child
        shutil.rmtree(path, ignore_errors=True)


def cli_pidfile(options: ClaudeAgentOptions) -> Path | None:
    """Where the launcher writes the pid of the CLI started with ``options``."""
    env = getattr(options, "env", None) or {}
    value = env.get(PIDFILE_ENV)
    return Path(value) if value else None


def cli_env() -> dict[str, str]:
    """The ``env`` of the CLI's options: the CLI's own settings, and every
    server variable it must not see blanked (and, through the launcher,
    removed: the SDK starts the CLI with ``os.environ`` plus these)."""
    environ = dict(os.environ)
    hidden = sorted(name for name in environ if not cli_may_see(name, environ))
    env = {name: "" for name in hidden}
    env.update({
        "OMNI_CLI_UNSET": " ".join(name for name in hidden if SHELL_NAME.fullmatch(name)),
        "OMNI_CLI_REAL": real_cli_path(),
        "OMNI_CLI_SETPRIV": setpriv_path(),
        # one per client: build options for each client anew
        PIDFILE_ENV: str(runtime_dir() / uuid.uuid4().hex),
        "CLAUDE_CONFIG_DIR": str(settings.CLAUDE_CONFIG_DIR),
        # A server's CLI talks to the model endpoint and nothing else.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # A person is waiting: give up on an unreachable model in seconds,
        # not after the CLI's default ten retries (minutes).
        "CLAUDE_CODE_MAX_RETRIES": str(settings.OMNI_MODEL_MAX_RETRIES),
        # Write the user's message to the transcript before asking the model,
        # so a turn cut short (the CLI or the server killed) still resumes
        # with it.
        "CLAUDE_CODE_EAGER_FLUSH": "1",
    })
    if settings.OMNI_OFFLINE_MODEL:
        env["ANTHROPIC_BASE_URL"] = offline_model_url()
        env["ANTHROPIC_API_KEY"] = os.environ.get("ANTHROPIC_API_KEY") or "offline-model"
    return env


STORE_OUTAGE_MAX_SECONDS = 50.0


def session_store(*, fork_of: str | None = None):
    """The transcript store of the CLI's options (``OMNI_SESSION_STORE``), or
    None. ``fork_of``: the parent session a fork reads wherever it is stored
    (never moved: see ``DjangoSessionStore(shared_sessions=...)``)."""
    if not settings.OMNI_SESSION_STORE:
        return None
    from sessions_app.transcripts import DjangoSessionStore

    # A transcript write waits for a database that is away as long as a
    # turn's lease outlives it (the SDK gives up on a write after 60 s).
    return DjangoSessionStore(shared_sessions=(fork_of,) if fork_of else (),
                              outage_seconds=min(settings.OMNI_LEASE_SECONDS, STORE_OUTAGE_MAX_SECONDS))


def workspace_dir() -> Path:
    """The CLI's working directory, ``OMNI_WORKSPACE_DIR``. Its path names the
    transcripts' project in the store and the CLI tells it to the model, so
    every worker should use the same path (the default,
    ``/tmp/omni-workspace``, is the same on every machine). The default
    sits in a directory every user can write to: it must be this user's own
    directory (made 0700), never another user's or a symlink."""
    path = Path(settings.OMNI_WORKSPACE_DIR)
    if path == settings.DEFAULT_WORKSPACE_DIR:
        return _private_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def max_line_bytes() -> int:
    """The longest line the SDK takes from the CLI: a message's attachments
    at their limit as the line holds them (base64: 4 bytes for 3; a text
    file JSON-escaped: a newline takes 2), and room for the rest of the line
    (the SDK's default, 1 MiB, is less than one 1 MB image). A limit, not
    memory set aside."""
    return 2 * settings.OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES + 8 * 1024 * 1024


def build_options(
    preset: dict,
    *,
    resume: str | None = None,
    fork: bool = False,
    resume_at: str | None = None,
    session_store=None,
    context=None,
) -> ClaudeAgentOptions:
    """Options for a client of ``preset``. ``context``: the
    :class:`~chat_app.tools.ToolContext` its tools and permission callbacks
    act for (each turn on the client sets its caller)."""
    from .tools import ToolContext
    from .tools.options import tool_options

    Path(settings.CLAUDE_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    return ClaudeAgentOptions(
        system_prompt=preset["system_prompt"],
        model=preset.get("model") or None,
        # None of the CLI's own tools (Bash, Read, Write...): an agent acts
        # only through the MCP tools its preset lists.
        tools=[],
        **tool_options(preset, context if context is not None else ToolContext()),
        setting_sources=[],  # no user or project settings from the server's disk
        resume=resume,
        fork_session=fork,
        resume_session_at=resume_at,
        include_partial_messages=True,
        # The CLI mirrors each transcript line to the SDK (the store) as one
        # stdout line: a message's attachments, base64, are in one.
        max_buffer_size=max_line_bytes(),
        cwd=str(workspace_dir()),
        env=cli_env(),
        session_store=session_store,
        # Each transcript line goes to the store as the CLI writes it, not
        # once at the turn's result: the person's message (written before the
        # model is called, CLAUDE_CODE_EAGER_FLUSH) and each finished reply
        # survive this process dying mid-turn, on every worker.
        session_store_flush="eager",
        # The launcher: no server secrets in the CLI's environment, and the
        # CLI dies with this process (see chat_app/bin/claude-launcher).
        cli_path=str(LAUNCHER),
        # A user's message is text for the model (contract §6): no slash
        # commands or skills, no @path file mentions.
        verbatim_prompts=True,
        extra_args={"disable-slash-commands": None},
        # OMNI_LOG_FORMAT=json: the CLI's stderr becomes log records (one JSON
        # line each) instead of raw text in the server's stderr
        stderr=_log_cli_stderr if settings.OMNI_LOG_FORMAT == "json" else None,
    )


_cli_log = logging.getLogger("omni.cli")


def _log_cli_stderr(line: str) -> None:
    if line := line.rstrip("\n"):
        _cli_log.warning("[CLI] %s", line)
