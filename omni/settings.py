"""Settings for Omni sessions, driven by the environment (CONTRACT.md §2)."""

import os
import secrets
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from omni.db.urls import database_from_url
from sessions_app.attachments.storage import storage_config

BASE_DIR = Path(__file__).resolve().parent.parent


def env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


# --- Data directory: the default database and the Claude config dir live here.
DATA_DIR = Path(os.environ.get("OMNI_DATA_DIR") or BASE_DIR / ".omni-ai").expanduser().resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
CLAUDE_CONFIG_DIR = Path(os.environ.get("CLAUDE_CONFIG_DIR") or DATA_DIR / "claude").expanduser()
# The CLI's working directory: an empty directory (an agent has no file tools).
# Its path names the transcripts' project and is shown to the model, so the
# default is one fixed path on every machine, whatever the data dir: a thread
# moving between workers changes nothing the model sees, and the path tells
# nothing about the server (chat_app.sdk.workspace_dir).
DEFAULT_WORKSPACE_DIR = Path("/tmp/omni-workspace")
OMNI_WORKSPACE_DIR = Path(os.environ.get("OMNI_WORKSPACE_DIR") or DEFAULT_WORKSPACE_DIR).expanduser()


def _read_secret_key(path: Path, wait: float = 5.0) -> str | None:
    """The key in ``path``; None when there is no such file. A file still
    empty (made by a writer without hard links, see below) is waited for."""
    deadline = time.monotonic() + wait
    while True:
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            return None
        if key:
            return key
        if time.monotonic() > deadline:
            raise ImproperlyConfigured(
                f"{path} is empty: delete it (a new key is generated) or set OMNI_SECRET_KEY")
        time.sleep(0.05)


def _create_secret_key(path: Path) -> None:
    """Write a new key to ``path`` unless another process got there first.

    Workers sharing a data dir may start at the same moment: exactly one key
    wins, and no one ever reads a partial file or one readable by others.
    The key goes to a temporary file of mode 0600 (``mkstemp``) beside
    ``path``, then is hard-linked to ``path``, which fails if it exists.
    A filesystem without hard links gets ``O_CREAT | O_EXCL`` (mode 0600),
    whose readers wait for its content."""
    key = secrets.token_urlsafe(50)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            return  # another process's key won: use it
        except OSError:
            pass  # no hard links here
    finally:
        os.unlink(tmp)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(key)


def _secret_key() -> tuple[str, Path | None]:
    """``OMNI_SECRET_KEY``, else the key in ``<OMNI_DATA_DIR>/secret_key``
    (generated on first use); and that file, if the key came from it."""
    if key := os.environ.get("OMNI_SECRET_KEY"):
        return key, None
    path = DATA_DIR / "secret_key"
    if (key := _read_secret_key(path)) is None:
        _create_secret_key(path)
        key = _read_secret_key(path)
    return key, path


# A secret_key file readable by others is reported by `manage.py check` (omni.W002).
SECRET_KEY, SECRET_KEY_FILE = _secret_key()
DEBUG = env_flag("OMNI_DEBUG")
ALLOWED_HOSTS = os.environ.get("OMNI_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
CSRF_TRUSTED_ORIGINS = [
    origin for origin in os.environ.get("OMNI_CSRF_TRUSTED_ORIGINS", "").split(",") if origin
]

# --- Production behind TLS (OMNI_SECURE=1): secure cookies, HSTS, HTTPS
# redirects; `manage.py check --deploy` passes with the settings README lists.
OMNI_SECURE = env_flag("OMNI_SECURE")
if OMNI_SECURE:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_flag("OMNI_SSL_REDIRECT", "1")
    SECURE_REDIRECT_EXEMPT = [r"^api/health$"]  # load balancers probe over plain HTTP
    SECURE_HSTS_SECONDS = int(os.environ.get("OMNI_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_flag("OMNI_HSTS_INCLUDE_SUBDOMAINS", "1")
    SECURE_HSTS_PRELOAD = env_flag("OMNI_HSTS_PRELOAD")
    if not SECURE_HSTS_PRELOAD:
        # Preloading commits the whole domain to HTTPS for browsers: opt-in.
        SILENCED_SYSTEM_CHECKS = ["security.W021"]
if env_flag("OMNI_BEHIND_TLS_PROXY"):
    # A proxy terminates TLS and says so in X-Forwarded-Proto.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",  # login throttling
    "channels",
    "ninja",
    "omni.db",  # closes a request's own database connections when it finishes
    "sessions_app",
    "chat_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "omni.middleware.ApiErrorMiddleware",
    "omni.middleware.JsonBodyMiddleware",  # 415 for an /api/ body that is not JSON
    "omni.static.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: a locked-out login's answer
]

ROOT_URLCONF = "omni.urls"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "omni.asgi.application"

# --- Database (DATABASE_URL; default: the embedded libSQL file).
DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL"), DATA_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer: Redis when REDIS_URL is set (several processes), else in memory.
if REDIS_URL := os.environ.get("REDIS_URL"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chat_app.redis_layer.RedisChannelLayer",  # channels_redis, quiet in an outage
            "CONFIG": {
                # redis-py 8 gives up reading after 5 s by default, exactly
                # channels_redis's blocking-pop timeout: allow more.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 2}],
                # Key prefix: several deployments (or test runs) may share one Redis.
                "prefix": os.environ.get("OMNI_REDIS_PREFIX", "omni"),
                # A follower's channel buffers a turn's live events while its
                # client reads slowly (the default, 100, drops the rest).
                "capacity": 1000,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Login throttling (django-axes) on the admin's and the page's login: after
# OMNI_LOGIN_FAILURE_LIMIT failed logins of one username from one address,
# even the right password is refused (429) until OMNI_LOGIN_COOLOFF_SECONDS
# pass with no further attempt. Counted in the database (every worker).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(os.environ.get("OMNI_LOGIN_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = timedelta(seconds=float(os.environ.get("OMNI_LOGIN_COOLOFF_SECONDS", "900")))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_DISABLE_ACCESS_LOG = True  # failed attempts only: no row per successful login
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# The chat page's own files (static/chat/): plain ES modules and CSS.
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve app static files (admin, API docs) straight from the apps: no
# collectstatic step, nothing fetched from a CDN.
WHITENOISE_USE_FINDERS = True

# The page's login (OMNI_AUTH=required): Django's own auth views.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"

# --- Omni sessions.
# "off": trust the resourceId a client sends; "required": callers authenticate.
OMNI_AUTH = os.environ.get("OMNI_AUTH", "required").strip().lower()
OMNI_OFFLINE_MODEL = env_flag("OMNI_OFFLINE_MODEL")
# How often the CLI retries a failed model call before the turn ends with
# "model_unavailable" (each retry waits longer: 3 retries is about 4 s).
OMNI_MODEL_MAX_RETRIES = int(os.environ.get("OMNI_MODEL_MAX_RETRIES", "3"))
OMNI_MAX_MESSAGE_CHARS = 100_000
# Request bodies: over this many bytes, 413 before the body is read (daphne,
# omni/bodylimit.py) and Django's own check when a view reads it. 2.5 MiB
# (Django's default) holds a message of OMNI_MAX_MESSAGE_CHARS characters
# even if each one is sent as a JSON-escaped surrogate pair (12 bytes).
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("OMNI_MAX_BODY_BYTES", "2621440"))
# --- Attachments (contract §11, sessions_app/attachments/).
# The largest upload (413 beyond, refused at the headers when the request
# says its length: omni/bodylimit.py allows the upload path this much more
# than other calls, plus room for the multipart framing).
OMNI_ATTACHMENT_MAX_MB = float(os.environ.get("OMNI_ATTACHMENT_MAX_MB", "20"))
OMNI_ATTACHMENT_MAX_BYTES = int(OMNI_ATTACHMENT_MAX_MB * 1024 * 1024)
# An upload never sent in a message is deleted after this many hours
# (prune_sessions, and a sweep every OMNI_ATTACHMENT_SWEEP_SECONDS).
OMNI_ATTACHMENT_ORPHAN_HOURS = float(os.environ.get("OMNI_ATTACHMENT_ORPHAN_HOURS", "24"))
OMNI_ATTACHMENT_SWEEP_SECONDS = float(os.environ.get("OMNI_ATTACHMENT_SWEEP_SECONDS", "3600"))
OMNI_ATTACHMENTS_PER_MESSAGE = 20
# The stored bytes of one message's attachments together (413
# attachments_too_large beyond): the Messages API takes about 32 MB a
# request, and base64 makes 3 bytes 4. On a libSQL server less: the
# transcript line holding them is one statement of one WebSocket message
# (4 MiB in libsql-client's and aiohttp's defaults).
_REMOTE_LIBSQL = (os.environ.get("DATABASE_URL") or "").split(":", 1)[0].lower() in ("libsql", "ws", "wss")
OMNI_ATTACHMENTS_MESSAGE_MAX_MB = float(os.environ.get("OMNI_ATTACHMENTS_MESSAGE_MAX_MB",
                                                       "2.5" if _REMOTE_LIBSQL else "22"))
OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES = int(OMNI_ATTACHMENTS_MESSAGE_MAX_MB * 1024 * 1024)
# Images: a longer side is scaled down to this (what the model reads at
# full resolution); an image of more pixels than this is refused before it
# is decoded (Pillow's decompression-bomb guard, 400 invalid_attachment).
OMNI_IMAGE_MAX_SIDE = 1568
OMNI_IMAGE_MAX_PIXELS = int(os.environ.get("OMNI_IMAGE_MAX_PIXELS", str(50_000_000)))
# Where attachments are kept: unset, files under <OMNI_DATA_DIR>/attachments/;
# s3://BUCKET/PREFIX, an S3-compatible store (endpoint and credentials from
# the standard AWS_* variables) shared by every server process
# (sessions_app/attachments/storage.py; anything else: ImproperlyConfigured).
OMNI_ATTACHMENT_STORAGE = os.environ.get("OMNI_ATTACHMENT_STORAGE", "").strip()
ATTACHMENTS_DIR = DATA_DIR / "attachments"


STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "attachments": storage_config(OMNI_ATTACHMENT_STORAGE, ATTACHMENTS_DIR),
}

# Turns a resource may start per minute (429 rate_limited beyond).
OMNI_TURNS_PER_MINUTE = int(os.environ.get("OMNI_TURNS_PER_MINUTE", "30"))
# The CLI's environment: names of server variables passed to it beyond the
# built-in list (chat_app/sdk.py: CLI_ENV_NAMES); every other one is removed.
OMNI_CLI_ENV_PASS = frozenset(
    name.strip() for name in os.environ.get("OMNI_CLI_ENV_PASS", "").split(",") if name.strip()
)
# The Claude Code CLI to run (default: the SDK's bundled CLI).
OMNI_CLI_PATH = os.environ.get("OMNI_CLI_PATH") or None

# --- Warm Claude processes (chat_app/pool.py). A live CLI holds ~220-250 MB:
# the default budget of 24 stays under 6 GB on a 2-core, 24 GB machine.
OMNI_MAX_PROCESSES = int(os.environ.get("OMNI_MAX_PROCESSES", "24"))
OMNI_WARM_CLIENTS = int(os.environ.get("OMNI_WARM_CLIENTS", "16"))
OMNI_SPARE_CLIENTS = int(os.environ.get("OMNI_SPARE_CLIENTS", "1"))
OMNI_WARM_IDLE_SECONDS = float(os.environ.get("OMNI_WARM_IDLE_SECONDS", "600"))
OMNI_WARM_MAX_TURNS = int(os.environ.get("OMNI_WARM_MAX_TURNS", "100"))
OMNI_WARM_MAX_RSS_MB = int(os.environ.get("OMNI_WARM_MAX_RSS_MB", "1024"))
# A spare whose CLI has not started (connected) within this long is killed and its place freed.
OMNI_CLI_START_SECONDS = float(os.environ.get("OMNI_CLI_START_SECONDS", "60"))
# A turn whose CLI sends nothing for this long is ended (turn_timeout).
OMNI_TURN_SILENCE_SECONDS = float(os.environ.get("OMNI_TURN_SILENCE_SECONDS", "300"))
# Concurrent turns per resource (429 rate_limited beyond).
OMNI_MAX_TURNS_PER_RESOURCE = int(os.environ.get("OMNI_MAX_TURNS_PER_RESOURCE", "4"))
# An open websocket's caller is checked again (token, session, active, rights)
# when its last check is this old, on its next frame or forwarded event.
OMNI_WS_RECHECK_SECONDS = float(os.environ.get("OMNI_WS_RECHECK_SECONDS", "5"))
# Messages that may wait in a busy thread's queue (contract §12): one more is 429 queue_full.
OMNI_MAX_QUEUED_PER_THREAD = int(os.environ.get("OMNI_MAX_QUEUED_PER_THREAD", "10"))
# Retry-After (seconds) of server_busy and rate_limited answers.
OMNI_BUSY_RETRY_AFTER = int(os.environ.get("OMNI_BUSY_RETRY_AFTER", "2"))

OMNI_DEFAULT_AGENT = "smart"
# How long a tool call waits for a person's decision; then it is denied
# ("expired") and never runs (contract §9).
OMNI_APPROVAL_TIMEOUT_SECONDS = float(os.environ.get("OMNI_APPROVAL_TIMEOUT_SECONDS", "600"))
# What one resource may spend on the model per UTC day, across all workers
# (0: no cap); a resource's own budget is set in the admin.
OMNI_DAILY_BUDGET_USD = float(os.environ.get("OMNI_DAILY_BUDGET_USD", "0"))
# GET /metrics (Prometheus) answers Authorization: Bearer <this>; unset: 404.
OMNI_METRICS_TOKEN = os.environ.get("OMNI_METRICS_TOKEN", "").strip() or None

OMNI_AGENTS = {
    "smart": {
        "description": "General assistant",
        "system_prompt": (
            "You are Smart, a helpful, concise general assistant. You can search and read the "
            "user's own past conversations, and delete one when they ask (they approve it first)."
        ),
        "model": os.environ.get("OMNI_MODEL_SMART") or None,
        # the project's own tools (chat_app/tools), served as the MCP server "omni";
        # delete_conversation waits for the person's approval
        "tools": ["search_conversations", "read_conversation", "delete_conversation"],
    },
    "datadog": {
        "description": "Observability assistant for metrics, logs and traces",
        "system_prompt": (
            "You are the Datadog agent: you help engineers read metrics, logs and "
            "traces and explain what they show."
        ),
        "model": os.environ.get("OMNI_MODEL_DATADOG") or None,
        "tools": [],
    },
    "correlator": {
        "description": "Finds links between incidents, changes and signals",
        "system_prompt": (
            "You are the Correlator agent: you connect incidents, deployments and "
            "signals into a likely causal story, and say how sure you are."
        ),
        "model": os.environ.get("OMNI_MODEL_CORRELATOR") or None,
        "tools": [],
    },
}

# Log lines: "text" (below) or "json", one JSON object per line, a turn's
# lines carrying its turnId, threadId and resourceId (omni/logs.py).
OMNI_LOG_FORMAT = os.environ.get("OMNI_LOG_FORMAT", "text").strip().lower() or "text"
if OMNI_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"OMNI_LOG_FORMAT must be text or json, not {OMNI_LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "omni.logs.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "omni.logs.JsonFormatter"},
    },
    "handlers": {"console": {
        "class": "logging.StreamHandler",
        "formatter": "json" if OMNI_LOG_FORMAT == "json" else "plain",
        "filters": ["context"],
    }},
    "loggers": {
        "omni": {
            "handlers": ["console"],
            "level": os.environ.get("OMNI_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
if OMNI_LOG_FORMAT == "json":  # every other logger's lines too (daphne's, asyncio's...)
    LOGGING["root"] = {"handlers": ["console"]}
    # daphne's access lines, made log records by omni/daphne.py
    LOGGING["loggers"]["daphne.access"] = {"handlers": ["console"], "level": "INFO", "propagate": False}
OMNI_SESSION_STORE = env_flag("OMNI_SESSION_STORE", "1")

# --- Scale-out (several server processes).
# A turn's lease on its thread (chat_app/leases.py): renewed every third of
# this while the turn runs; a dead worker's thread is free after at most this.
OMNI_LEASE_SECONDS = float(os.environ.get("OMNI_LEASE_SECONDS", "30"))
# How long a finished turn's events stay available to a reconnecting stream.
OMNI_STREAM_LINGER_SECONDS = float(os.environ.get("OMNI_STREAM_LINGER_SECONDS", "30"))
# An SSE stream sends a comment line after this many quiet seconds, so a
# proxy's idle timeout (often 60 s) does not cut a quiet turn.
OMNI_SSE_HEARTBEAT_SECONDS = float(os.environ.get("OMNI_SSE_HEARTBEAT_SECONDS", "15"))
# On SIGTERM: refuse new turns (503 server_busy) and let running ones finish
# for up to this long, then interrupt them.
OMNI_SHUTDOWN_GRACE_SECONDS = float(os.environ.get("OMNI_SHUTDOWN_GRACE_SECONDS", "8"))
