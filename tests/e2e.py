"""End-to-end helpers: a live daphne server (real SDK + CLI + offline model),
an SSE client on ``http.client`` and a websocket client on aiohttp.

The server runs as a subprocess, exactly as an operator starts it
(``manage.py migrate``, then ``daphne ... omni.asgi:application``), with a
data dir of its own, ``OMNI_AUTH=off`` and ``OMNI_OFFLINE_MODEL=1``. Its
database is the embedded libSQL file in that data dir, or, when the test run
itself has ``DATABASE_URL=postgres://...``, a fresh PostgreSQL database of its
own (``omni_e2e_<random>``) on the same server, dropped at the end.

The transcript store (``OMNI_SESSION_STORE``) is on, as by default, unless
the test run sets ``OMNI_SESSION_STORE`` itself, or
``sessions_app/transcripts.py`` does not exist (then it is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
START_TIMEOUT = 60
TURN_TIMEOUT = 60

# Variables of the test run that must not leak into the server's environment:
# the server gets its own data dir, database, auth mode and model.
PROJECT_VARS = ("DATABASE_URL", "REDIS_URL", "CLAUDE_CONFIG_DIR", "ANTHROPIC_BASE_URL",
                "ANTHROPIC_API_KEY", "OMNI_DATA_DIR", "OMNI_AUTH", "OMNI_OFFLINE_MODEL",
                "OMNI_SECRET_KEY", "OMNI_DEBUG", "OMNI_ALLOWED_HOSTS")


def python_bin() -> str:
    exe = VENV_BIN / "python"
    return str(exe) if exe.exists() else sys.executable


def daphne_cmd() -> list[str]:
    exe = VENV_BIN / "daphne"
    if exe.exists():
        return [str(exe)]
    if found := shutil.which("daphne"):
        return [found]
    return [sys.executable, "-m", "daphne"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_store_flag() -> str:
    if (value := os.environ.get("OMNI_SESSION_STORE")) is not None:
        return value
    return "1" if (ROOT / "sessions_app" / "transcripts.py").exists() else "0"


def store_enabled() -> bool:
    return session_store_flag().strip().lower() in ("1", "true", "yes", "on")


# --- processes -------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not stat:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces or parentheses
    return int(stat.rsplit(")", 1)[1].split()[1])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        if (parent := _ppid(p)) is not None:
            children.setdefault(parent, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return not stat or stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def is_cli(pid: int) -> bool:
    return "claude" in cmdline(pid) and not _is_zombie(pid)


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (orphans included)."""
    needle = f"{name}={value}".encode()
    found = []
    for p in _pids():
        if p == os.getpid() or _is_zombie(p):
            continue
        if needle in _read(f"/proc/{p}/environ").split(b"\0"):
            found.append(p)
    return found


# --- the server ------------------------------------------------------------------

def is_postgres(url: str | None) -> bool:
    return urlsplit(url or "").scheme.lower() in ("postgres", "postgresql", "pgsql")


def postgres_url() -> str:
    """The PostgreSQL server of tests that always need one: the run's own
    ``DATABASE_URL`` when it is PostgreSQL, else ``TEST_POSTGRES_URL``."""
    url = os.environ.get("DATABASE_URL", "")
    if is_postgres(url):
        return url
    return os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/omni")


def require_postgres(what: str) -> None:
    """The PostgreSQL server of :func:`postgres_url` must answer: ``what``
    (the tests needing it) is skipped without it, and fails under ``CI=true``."""
    try:
        import psycopg

        psycopg.connect(postgres_url().rsplit("/", 1)[0] + "/postgres", connect_timeout=3).close()
    except Exception as exc:
        message = f"{what} need PostgreSQL at {postgres_url()}: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def run_database() -> "PostgresDatabase | None":
    """A fresh PostgreSQL database when the test run itself is on PostgreSQL
    (``DATABASE_URL=postgres://...``); None on the embedded libSQL file."""
    url = os.environ.get("DATABASE_URL", "")
    return PostgresDatabase(url, migrated=True) if is_postgres(url) else None


# --- migrated templates -----------------------------------------------------------
# A server's first start runs ``manage.py migrate`` on its new database: ~4 s
# on this 2-core machine, for a schema that is the same every time. So the
# first one of a test run migrates a template (an embedded file, or a
# PostgreSQL database), and later servers start from a copy of it, as if
# they had migrated it themselves; a restart of a server that migrated its
# database does not migrate again. A database that already exists (a
# restored backup, a file shared by two servers, a proxied URL) is migrated
# as before. Tests of migrate itself (test_migrations, test_engine_remote)
# run it themselves.
MIGRATED_URLS: set[str] = set()  # PostgreSQL databases cloned from the template
_templates: dict[str, object] = {}


def _migrate(env: dict[str, str]) -> None:
    done = subprocess.run([python_bin(), "manage.py", "migrate", "--noinput"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"migrate failed:\n{done.stdout}\n{done.stderr}"


def migrated_file_template(env: dict[str, str]) -> Path:
    """A migrated embedded ``sessions.db`` of this test run."""
    if "file" not in _templates:
        import tempfile

        data_dir = Path(tempfile.mkdtemp(prefix="omni-e2e-template-"))
        _migrate({**{k: v for k, v in env.items() if k != "DATABASE_URL"}, "OMNI_DATA_DIR": str(data_dir)})
        template = data_dir / "sessions.db"
        assert template.exists() and not template.with_name("sessions.db-wal").exists(), \
            sorted(p.name for p in data_dir.iterdir())
        _templates["file"] = template
    return _templates["file"]


def migrated_postgres_template(admin_url: str) -> str:
    """The name of a migrated PostgreSQL database of this test run (dropped at its end)."""
    if "postgres" not in _templates:
        import atexit

        import psycopg

        name = f"omni_e2e_template_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop():
            with contextlib.suppress(Exception), \
                    psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')

        atexit.register(drop)
        env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
        env.update(DJANGO_SETTINGS_MODULE="omni.settings", OMNI_AUTH="off",
                   DATABASE_URL=urlunsplit(urlsplit(admin_url)._replace(path="/" + name)))
        import tempfile

        env["OMNI_DATA_DIR"] = tempfile.mkdtemp(prefix="omni-e2e-template-")
        _migrate(env)
        _templates["postgres"] = name
    return _templates["postgres"]


class PostgresDatabase:
    """A database of its own on the test run's PostgreSQL server."""

    def __init__(self, url: str, *, migrated: bool = False):
        """``migrated``: a copy of a migrated template (its server then
        needs no ``migrate``), else an empty database."""
        import psycopg

        self.psycopg = psycopg
        parts = urlsplit(url)
        self.name = f"omni_e2e_{uuid.uuid4().hex[:12]}"
        self.admin_url = urlunsplit(parts._replace(path="/postgres"))
        self.url = urlunsplit(parts._replace(path="/" + self.name))
        template = migrated_postgres_template(self.admin_url) if migrated else None
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            if template:
                conn.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{template}"')
            else:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        if template:
            MIGRATED_URLS.add(self.url)

    def tables(self) -> set[str]:
        with self.psycopg.connect(self.url, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
        return {name for (name,) in rows}

    def connections(self) -> int:
        """How many connections other than this one are open to the database."""
        with self.psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchone()
        return count

    def drop(self) -> None:
        with self.psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')


class Server:
    """A daphne subprocess serving ``omni.asgi:application``."""

    def __init__(self, data_dir: Path, database_url: str | None, extra_env: dict[str, str] | None = None):
        self.extra_env = dict(extra_env or {})
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self.seen_cli: set[int] = set()  # CLI pids seen below daphne
        self.postgres: PostgresDatabase | None = None  # its own database, when make_server made one
        self._migrated_url: str | None = None

    # --- lifecycle ---
    @property
    def claude_dir(self) -> Path:
        return self.data_dir / "claude"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
        env.update(
            OMNI_DATA_DIR=str(self.data_dir),
            OMNI_AUTH="off",
            OMNI_OFFLINE_MODEL="1",
            OMNI_SESSION_STORE=session_store_flag(),
            OMNI_LOG_LEVEL="INFO",
            # tests run many turns a minute on one resource (the limit has tests of its own)
            OMNI_TURNS_PER_MINUTE="0",
            PYTHONUNBUFFERED="1",
            DJANGO_SETTINGS_MODULE="omni.settings",
            # Spare processes only where a test asks for them: on 2 cores their
            # start-up would slow every other test's turns.
            OMNI_SPARE_CLIENTS="0",
        )
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env  # CI (and PATH, HOME...) pass through

    def start(self, port: int | None = None) -> None:
        """Migrate and serve; on ``port`` if given (a restart on the same
        address, as clients holding a URL see it), else on a free one."""
        env = self.env()
        self._migrate(env)
        self.starts += 1
        self.port = port or free_port()
        self.log_path = self.data_dir / f"daphne-{self.starts}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            daphne_cmd() + ["-b", "127.0.0.1", "-p", str(self.port), "omni.asgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daphne exited ({self.proc.returncode}):\n{self.log()}")
            try:
                status, _, _ = self.request("GET", "/api/openapi.json", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daphne did not answer within {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.1)

    def _migrate(self, env: dict[str, str]) -> None:
        """``manage.py migrate``, or what it would leave (see MIGRATED_URLS)."""
        url = env.get("DATABASE_URL")
        if self.starts and url == self._migrated_url:
            return  # a restart: this server migrated this database already
        if url is None and not (self.data_dir / "sessions.db").exists():
            shutil.copy2(migrated_file_template(env), self.data_dir / "sessions.db")
        elif url not in MIGRATED_URLS:
            _migrate(env)
        self._migrated_url = url

    def stop(self, timeout: float = 15) -> None:
        """Terminate daphne (SIGTERM, as an operator or a process manager
        does); fail if it is still running after ``timeout`` seconds (it is
        then killed) or if a CLI process it started outlives it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        self.seen_cli.update(p for p in descendants(proc.pid) if is_cli(p))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
                raise AssertionError(
                    f"daphne did not exit within {timeout}s of SIGTERM:\n{self.log()[-4000:]}")
        left = self.leftover_cli()
        if left:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(
                "CLI processes outlived the server: "
                + "; ".join(f"{p}: {cmdline(p)[:120]}" for p in left)
            )

    def restart(self) -> None:
        self.stop()
        self.start()

    def leftover_cli(self) -> list[int]:
        """CLI processes started for this server that are still alive: ones
        seen below daphne, and any process carrying this server's CLI config
        dir (which catches orphans reparented away from daphne)."""
        alive = {p for p in self.seen_cli if not _is_zombie(p) and Path(f"/proc/{p}").exists()
                 and "claude" in cmdline(p)}
        alive.update(processes_with_env("CLAUDE_CONFIG_DIR", str(self.claude_dir)))
        return sorted(alive)

    def local_transcripts(self, session_id: str) -> list[Path]:
        """The CLI's local files of a session under this server's config dir."""
        projects = self.claude_dir / "projects"
        return sorted(projects.glob(f"*/{session_id}.jsonl")) + sorted(
            p for p in projects.glob(f"*/{session_id}") if p.is_dir())

    def cli_children(self) -> list[int]:
        """CLI processes currently running below daphne."""
        if self.proc is None:
            return []
        found = [p for p in descendants(self.proc.pid) if is_cli(p)]
        self.seen_cli.update(found)
        return found

    def wait_no_cli(self, timeout: float = 10) -> list[int]:
        """Wait until no CLI process runs below daphne; the ones left, if any."""
        deadline = time.monotonic() + timeout
        while (left := self.cli_children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def unaccounted_cli(self, timeout: float = 10) -> list[int]:
        """Wait until every CLI process below daphne is one its pool reports
        (``GET /api/health``: running turns, warm clients, spares, closed
        ones still exiting); the processes beyond that count, if any."""
        deadline = time.monotonic() + timeout
        while True:
            _, _, health = self.request("GET", "/api/health")
            counts = health["processes"]
            live = self.cli_children()
            extra = live[counts["running"] + counts["warm"] + counts["spare"] + counts["exiting"]:]
            if not extra or time.monotonic() > deadline:
                return extra
            time.sleep(0.05)

    # --- log ---
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.data_dir.glob("daphne-*.log")))

    def wait_log(self, pattern: str, timeout: float = 15) -> str:
        """The first line of the current log matching the regex ``pattern``."""
        from tests.helpers import wait_for

        rx = re.compile(pattern)
        return wait_for(lambda: next((line for line in self.log().splitlines() if rx.search(line)), None),
                        timeout=timeout, message=lambda: f"a log line matching {pattern!r}:\n{self.log()[-4000:]}")

    # --- HTTP ---
    def connection(self, timeout: float = TURN_TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                timeout: float = 30, headers: dict | None = None) -> tuple[int, dict, object]:
        """``(status, headers, parsed JSON or text)``; ``body`` is JSON-encoded."""
        conn = self.connection(timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            extra, headers = headers or {}, {"Content-Type": "application/json"} if data is not None else {}
            headers.update(extra)
            conn.request(method, path, data, headers)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if hdrs.get("content-type", "").startswith("application/json"):
                return resp.status, hdrs, json.loads(text)
            return resp.status, hdrs, text
        finally:
            conn.close()

    def get_json(self, path: str, **query) -> tuple[int, object]:
        status, _, data = self.request("GET", f"{path}?{urlencode(query)}" if query else path)
        return status, data

    def sessions(self, resource_id: str, **query) -> dict:
        status, data = self.get_json("/api/sessions", resourceId=resource_id, **query)
        assert status == 200, data
        return data

    def metadata(self, thread_id: str, resource_id: str) -> tuple[int, dict]:
        status, _, data = self.request(
            "POST", "/api/sessions/metadata", {"threadId": thread_id, "resourceId": resource_id})
        return status, data

    # --- SSE ---
    def open_sse(self, path: str, body: dict | None, timeout: float = TURN_TIMEOUT,
                 headers: dict | None = None) -> "SSEStream":
        """POST ``body`` (or GET ``path`` when ``body`` is None) for an event stream."""
        conn = self.connection(timeout)
        if body is None:
            conn.request("GET", path, None, headers or {})
        else:
            conn.request("POST", path, json.dumps(body).encode(),
                         {"Content-Type": "application/json", **(headers or {})})
        return SSEStream(conn, conn.getresponse())

    def sse(self, path: str, body: dict, timeout: float = TURN_TIMEOUT) -> "SSEResult":
        """POST and read the whole answer: events of a stream, or a JSON error."""
        with self.open_sse(path, body, timeout) as stream:
            return stream.result()

    def chat(self, message: str, resource_id: str, thread_id: str | None = None, **extra) -> "SSEResult":
        body = {"message": message, "resourceId": resource_id, **extra}
        if thread_id is not None:
            body["threadId"] = thread_id
        return self.sse("/api/chat", body)

    def fork(self, message: str, resource_id: str, parent: str, thread_id: str, **extra) -> "SSEResult":
        return self.sse("/api/chat/fork", {
            "message": message, "resourceId": resource_id,
            "forkFromThreadId": parent, "threadId": thread_id, **extra,
        })

    def ws_url(self, path: str = "/ws/chat/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


class SSEResult:
    def __init__(self, status: int, headers: dict, events: list[dict], body: object = None):
        self.status = status
        self.headers = headers
        self.events = events
        self.body = body  # the JSON (or text) of a non-stream answer

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]

    def chunks(self, kind: str) -> list[dict]:
        return [e["chunk"] for e in self.of("chunk") if e["chunk"].get("kind") == kind]

    @property
    def session(self) -> dict:
        assert self.events and self.events[0]["type"] == "session", self.describe()
        return self.events[0]

    @property
    def session_id(self) -> str:
        return self.session["sessionId"]

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.of("text"))

    @property
    def last(self) -> dict:
        return self.events[-1]

    def describe(self) -> str:
        if self.body is not None:
            return f"HTTP {self.status}: {self.body!r}"
        return f"HTTP {self.status}: " + ", ".join(
            e["type"] + (f"({e.get('code')}: {e.get('message')})" if e["type"] == "error" else "")
            for e in self.events)

    def assert_ok(self) -> "SSEResult":
        assert self.status == 200, self.describe()
        assert self.events and self.events[-1]["type"] == "done", self.describe()
        return self


class SSEStream:
    """An open ``text/event-stream`` answer, read event by event."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn = conn
        self.resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.events: list[dict] = []
        self.ids: list[str | None] = []  # each event's SSE ``id:`` field

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def is_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def next_event(self) -> dict | None:
        """The next event, or None at the end of the stream."""
        data: list[str] = []
        event_id = None
        while True:
            line = self.resp.readline()
            if not line:
                if data:
                    raise AssertionError(f"stream ended inside an event: {data!r}")
                return None
            line = line.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    event = json.loads("\n".join(data))
                    self.events.append(event)
                    self.ids.append(event_id)
                    return event
                continue
            if line.startswith(":"):  # an SSE comment (keep-alive)
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            elif field == "id":
                event_id = value[1:] if value.startswith(" ") else value
            # other fields (event:, retry:) are not part of the contract

    def read_until(self, kind: str) -> dict:
        while (event := self.next_event()) is not None:
            if event["type"] == kind:
                return event
        raise AssertionError(f"the stream ended before a {kind!r} event: {[e['type'] for e in self.events]}")

    def result(self) -> SSEResult:
        if not self.is_stream:
            text = self.resp.read().decode("utf-8", "replace")
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return SSEResult(self.status, self.headers, [], body)
        while self.next_event() is not None:
            pass
        return SSEResult(self.status, self.headers, list(self.events))

    def close(self) -> None:
        """Drop the connection (mid-stream: the client going away)."""
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.resp.close()
        self.conn.close()


# --- websocket -------------------------------------------------------------------

class WSClient:
    """A websocket client (aiohttp) that reads the contract's JSON events."""

    def __init__(self, session, ws):
        self.session = session
        self.ws = ws
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, server: Server, headers: dict | None = None) -> "WSClient":
        import aiohttp

        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10))
        try:
            ws = await session.ws_connect(server.ws_url(), headers=headers or {},
                                          timeout=aiohttp.ClientWSTimeout(ws_close=10))
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()

    async def send(self, frame) -> None:
        if isinstance(frame, str):
            await self.ws.send_str(frame)
        else:
            await self.ws.send_json(frame)

    async def recv(self, timeout: float = TURN_TIMEOUT) -> dict:
        import aiohttp

        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type!r} {msg.data!r}")
        event = json.loads(msg.data)
        self.events.append(event)
        return event

    async def recv_until(self, *kinds: str, timeout: float = TURN_TIMEOUT) -> list[dict]:
        """Events up to and including the first whose type is in ``kinds``."""
        out = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {kinds} event within {timeout}s: {[e['type'] for e in out]}")
            event = await self.recv(timeout=left)
            out.append(event)
            if event["type"] in kinds:
                return out

    async def turn(self, frame: dict, timeout: float = TURN_TIMEOUT) -> SSEResult:
        """Send a message/fork frame and read its events through done or error."""
        await self.send(frame)
        # status 200: the turn started (a turn that cannot start gets one error event)
        return SSEResult(200, {}, await self.recv_until("done", "error", timeout=timeout))


# --- fixtures ----------------------------------------------------------------------

class ServerPair:
    """Servers ``a`` and ``b`` on one database: ``pg``, a PostgreSQL
    database of their own dropped at the end, or None. Subclasses set the
    three in ``__init__``; :meth:`cleanup` is for anything else they share."""

    a: Server
    b: Server
    pg: PostgresDatabase | None = None

    def __iter__(self):
        return iter((self.a, self.b))

    def start(self) -> None:
        self.a.start()
        self.b.start()

    def stop(self) -> None:
        """Stop both (each checked for leftover CLI processes), drop the database, clean up."""
        try:
            try:
                self.a.stop()
            finally:
                self.b.stop()
        finally:
            try:
                if self.pg:
                    self.pg.drop()
            finally:
                self.cleanup()

    def cleanup(self) -> None:
        pass


def make_server(tmp_path_factory, server_class: type[Server] = Server,
                **options) -> tuple[Server, PostgresDatabase | None]:
    data_dir = tmp_path_factory.mktemp("omni-e2e-server")
    pg = run_database()
    server = server_class(data_dir, pg.url if pg else None, **options)
    server.postgres = pg
    try:
        server.start()
        if pg:  # the server migrated (and serves) the database of its own
            assert "sessions_app_sessionmapping" in pg.tables(), pg.tables()
    except BaseException:
        stop_server(server, pg)
        raise
    return server, pg


def stop_server(server: Server, pg: PostgresDatabase | None) -> None:
    """Stop a ``make_server`` server (checked for leftover CLI processes),
    then drop its PostgreSQL database, whatever the stop raised."""
    try:
        server.stop()
    finally:
        if pg:
            pg.drop()


def issue_token(server: Server, username: str) -> str:
    """A new API token of ``username`` (``manage.py issue_token`` on the server's database)."""
    done = subprocess.run(
        [python_bin(), "manage.py", "issue_token", username],
        cwd=ROOT, env=server.env(), capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def serving(tmp_path_factory, server_class: type[Server] = Server, **options):
    """A module fixture's body: yields a started server; at the end stops it
    (checked for leftover CLI processes) and drops its PostgreSQL database."""
    server, pg = make_server(tmp_path_factory, server_class, **options)
    try:
        yield server
    finally:
        stop_server(server, pg)


@pytest.fixture(scope="module")
def daphne_server(tmp_path_factory, server_env):
    """A daphne server for the module (with ``server_env``)."""
    yield from serving(tmp_path_factory, extra_env=server_env)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def reply(last: str, *earlier: str) -> str:
    """The offline model's answer to ``last`` after the user texts ``earlier``."""
    quoted = " | ".join(f'"{t[:200]}"' for t in earlier) or "none"
    return f'Offline model heard: "{last[:200]}". Earlier questions: {quoted}.'
