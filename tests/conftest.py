import os

import pytest


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Users' passwords hashed with MD5: Django's default hasher takes a
    noticeable fraction of a second per user on 2 cores."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def auth_off(settings):
    """Most tests act as the manual guide does: trusting ``resourceId``.
    Tests of authentication set ``settings.OMNI_AUTH = "required"`` again."""
    settings.OMNI_AUTH = "off"


@pytest.fixture(autouse=True)
def attachments_dir(settings, tmp_path_factory):
    """Every test keeps its attachments in a directory of its own (never
    the real data dir's ``attachments/``); returns that directory."""
    path = tmp_path_factory.mktemp("attachments")
    settings.STORAGES = {**settings.STORAGES, "attachments": {
        **settings.STORAGES["attachments"],
        "OPTIONS": {**settings.STORAGES["attachments"].get("OPTIONS", {}), "location": str(path)},
    }} if "FileSystemStorage" in settings.STORAGES["attachments"]["BACKEND"] else settings.STORAGES
    return path


@pytest.fixture
def offline_chat(settings, tmp_path):
    """Turns in this process run the real SDK and CLI against the offline
    model, with a data dir (workspace, CLI config) of their own."""
    settings.OMNI_OFFLINE_MODEL = True
    # No spare CLIs in the background unless a test asks for them: on 2 cores
    # they slow every turn, and one still connecting when the test's event
    # loop closes leaves its tools' MCP session tasks behind (the server's
    # shutdown waits for a spare's start; a test's loop cannot).
    settings.OMNI_SPARE_CLIENTS = 0
    settings.DATA_DIR = tmp_path / "data"
    settings.CLAUDE_CONFIG_DIR = tmp_path / "data" / "claude"
    settings.OMNI_WORKSPACE_DIR = tmp_path / "data" / "workspace"
    settings.DATA_DIR.mkdir()
    return settings


@pytest.fixture(autouse=True)
def close_async_orm_connections():
    """Async ORM calls (and turns, which run outside any request) use
    asgiref's shared sync thread; close that thread's connections after each
    test so the test database can be flushed and, on PostgreSQL, dropped."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def empty_process_pool(request):
    """An async test serves turns on its own event loop, as the server does
    on its own (``pool.start()``, from ``chat_app.lifecycle.startup``), and
    stops its pool at its end as daphne does at shutdown: no warm Claude
    process outlives the test."""
    import inspect

    from chat_app.pool import pool
    from chat_app.turns import registry

    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("close_process_pool")
    yield pool
    registry.draining = False  # a test that shut the registry down


@pytest.fixture
async def close_process_pool():
    from chat_app.pool import pool

    pool.start()
    yield
    await pool.shutdown()


@pytest.fixture
def config_dir(settings, tmp_path):
    """The CLI's config dir of this test: a tmp dir of its own (a module
    that reads or writes transcripts on disk asks for it)."""
    settings.CLAUDE_CONFIG_DIR = tmp_path / "claude"
    settings.CLAUDE_CONFIG_DIR.mkdir()
    return settings.CLAUDE_CONFIG_DIR


@pytest.fixture
def warm(offline_chat):
    """Warm processes for up to four threads, no spares."""
    offline_chat.OMNI_SPARE_CLIENTS = 0
    offline_chat.OMNI_MAX_PROCESSES = 4
    offline_chat.OMNI_WARM_CLIENTS = 4
    return offline_chat


def _records_of(caplog, name):
    """caplog with the INFO records of logger ``name``, which does not
    propagate to the root."""
    import logging

    logger = logging.getLogger(name)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger=name)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def chat_log(caplog):
    """Records of logger ``omni.chat``."""
    yield from _records_of(caplog, "omni.chat")


@pytest.fixture
def pool_log(caplog):
    """Records of logger ``omni.pool``."""
    yield from _records_of(caplog, "omni.pool")


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    """Extra environment of a module's ``daphne_server`` (tests/e2e.py);
    a module overrides this fixture to change it."""
    return {}


@pytest.fixture(autouse=True)
def fresh_turn_rate(settings):
    """Every test starts with no turns counted against a resource's limits:
    the database's counts go with the test database's rows; with
    ``REDIS_URL`` set, each test counts under a Redis key prefix of its
    own; this process's limiter state (Redis clients, timers) is dropped."""
    import uuid

    from chat_app import limits

    limits.reset()
    if getattr(settings, "REDIS_URL", None):
        base = getattr(settings, "OMNI_REDIS_PREFIX", None) or os.environ.get("OMNI_REDIS_PREFIX", "omni")
        settings.OMNI_REDIS_PREFIX = f"{base}-test-{uuid.uuid4().hex[:8]}"
    yield
    limits.reset()
