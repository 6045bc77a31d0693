"""Structured logs (``OMNI_LOG_FORMAT=json``, omni/logs.py): one JSON object
per line, a turn's lines carrying its ids; the text format unchanged."""

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.utils.module_loading import import_string

from omni import logs
from tests.helpers import events_of, turn_bodies

ROOT = Path(__file__).resolve().parent.parent
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class JsonLog:
    """What a handler configured like settings' console handler, with the
    JSON formatter, wrote for logger ``omni`` (``omni.chat``, ``omni.pool``...)."""

    def __init__(self, stream: io.StringIO):
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict]:
        out = []
        for raw in self.text.splitlines():
            line = json.loads(raw)  # every line is one JSON object
            assert isinstance(line, dict), raw
            out.append(line)
        return out

    def of_turn(self, turn_id: str) -> list[dict]:
        return [line for line in self.lines() if line.get("turnId") == turn_id]


def settings_handler(stream, formatter: str = "json") -> logging.Handler:
    """A StreamHandler on ``stream`` with settings.LOGGING's ``formatter``
    and the console handler's filters."""
    config = settings.LOGGING
    handler = logging.StreamHandler(stream)
    spec = config["formatters"][formatter]
    handler.setFormatter(import_string(spec["()"])() if "()" in spec else logging.Formatter(spec["format"]))
    for name in config["handlers"]["console"]["filters"]:
        handler.addFilter(import_string(config["filters"][name]["()"])())
    return handler


@pytest.fixture
def json_log():
    stream = io.StringIO()
    handler = settings_handler(stream)
    logger = logging.getLogger("omni")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield JsonLog(stream)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class FakeTurn:
    """What ``logs.bind_turn`` reads of a ``Turn``."""

    def __init__(self, turn_id, thread_id="th-1", resource_id="res-1"):
        self.turn_id, self.finished = turn_id, False
        self.spec = SimpleNamespace(thread_id=thread_id, resource_id=resource_id)


# --- the formatter and the context (no database, no CLI) ----------------------------

@pytest.mark.engine_agnostic
def test_a_line_has_time_level_logger_and_message_and_no_ids_outside_a_turn(json_log):
    logging.getLogger("omni.chat").info("[CHAT] Saved session mapping thread=%s", "a\nb")
    [line] = json_log.lines()
    assert TIME.match(line["time"]), line
    assert line == {"time": line["time"], "level": "INFO", "logger": "omni.chat",
                    "message": "[CHAT] Saved session mapping thread=a\nb"}
    assert json_log.text.count("\n") == 1  # the message's newline is escaped


@pytest.mark.engine_agnostic
def test_an_exception_is_a_traceback_field_on_the_same_line(json_log):
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        logging.getLogger("omni.chat").exception("[CHAT] Turn x failed")
    assert json_log.text.count("\n") == 1
    [line] = json_log.lines()
    assert line["level"] == "ERROR" and line["message"] == "[CHAT] Turn x failed"
    assert line["traceback"].startswith("Traceback (most recent call last):\n")
    assert line["traceback"].endswith("RuntimeError: disk on fire")


@pytest.mark.engine_agnostic
async def test_each_task_logs_its_own_ids_and_tasks_it_starts_inherit_them(json_log):
    log = logging.getLogger("omni.chat")
    both = asyncio.Barrier(2)

    async def turn(n):
        me = FakeTurn(f"turn-{n}", f"thread-{n}", f"res-{n}")  # (bound weakly: as the registry, keep it)
        logs.bind_turn(me)
        await both.wait()  # the two tasks interleave
        log.info("from turn %s", n)
        logs.bind(pid=1000 + n)
        await asyncio.sleep(0)  # not a wait: lets the other task run in between (the interleaving under test)
        log.info("pid of turn %s", n)
        await asyncio.create_task(child(n))

    async def child(n):
        log.info("child of turn %s", n)

    await asyncio.gather(asyncio.create_task(turn(1)), asyncio.create_task(turn(2)))
    log.info("outside")
    lines = {line["message"]: line for line in json_log.lines()}
    for n in (1, 2):
        ids = {"turnId": f"turn-{n}", "threadId": f"thread-{n}", "resourceId": f"res-{n}"}
        assert lines[f"from turn {n}"].items() >= ids.items()
        assert "pid" not in lines[f"from turn {n}"]
        assert lines[f"pid of turn {n}"].items() >= {**ids, "pid": 1000 + n}.items()
        assert lines[f"child of turn {n}"].items() >= {**ids, "pid": 1000 + n}.items()
    assert "turnId" not in lines["outside"]


@pytest.mark.engine_agnostic
async def test_bound_is_for_a_block_and_a_finished_turns_ids_lapse(json_log):
    log = logging.getLogger("omni.chat")

    async def body():
        with logs.bound(turn_id="block", thread_id="th", resource_id="r"):
            log.info("inside")
        log.info("after the block")
        turn = FakeTurn("lapsing")
        logs.bind_turn(turn)
        log.info("running")
        turn.finished = True  # e.g. a task its CLI's SDK started, used by a later turn
        log.info("finished")
        await asyncio.create_task(callback())  # started from the finished turn's context
        with pytest.raises(TypeError):
            logs.bind(message="not a field")

    async def callback():  # a tool's SDK callback on a warm client, serving a later turn
        logs.bind_caller(SimpleNamespace(turn_id="later", thread_id="th", resource_id="r"))
        log.info("callback")

    await asyncio.create_task(body())
    lines = {line["message"]: line for line in json_log.lines()}
    assert lines["inside"]["turnId"] == "block"
    assert "turnId" not in lines["after the block"]
    assert lines["running"]["turnId"] == "lapsing"
    assert "turnId" not in lines["finished"]
    assert lines["callback"]["turnId"] == "later"


@pytest.mark.engine_agnostic
def test_the_text_format_is_unchanged():
    stream = io.StringIO()
    handler = settings_handler(stream, "plain")
    logger = logging.getLogger("omni.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    token = logs.bind(turn_id="t", thread_id="th", resource_id="r", pid=7)
    try:
        logger.warning("[CHAT] Resuming session: %s", "sess-1")
    finally:
        logs.reset(token)
        logger.removeHandler(handler)
    assert settings.LOGGING["formatters"]["plain"]["format"] == "%(asctime)s %(levelname)s %(name)s %(message)s"
    assert re.fullmatch(r"\S+ \S+ WARNING omni\.test_logs \[CHAT\] Resuming session: sess-1\n", stream.getvalue())


def run_settings(env: dict, code: str) -> subprocess.CompletedProcess:
    """``code`` in a new Python process after ``django.setup()`` with ``env``."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMNI_LOG_FORMAT", "OMNI_LOG_LEVEL")}
    full.update(DJANGO_SETTINGS_MODULE="omni.settings", **env)
    return subprocess.run([sys.executable, "-c", "import django; django.setup()\n" + code],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.engine_agnostic
def test_settings_write_every_line_as_json_with_omni_log_format_json(tmp_path):
    code = """
import logging
from types import SimpleNamespace
from omni import logs
chat = logging.getLogger("omni.chat")
chat.info("[CHAT] Saved session mapping thread=%s", "t")
class Turn:
    turn_id, finished, spec = "tid", False, SimpleNamespace(thread_id="th", resource_id="res")
turn = Turn()
logs.bind_turn(turn)
logs.bind(pid=4242)
chat.info("[CHAT] Resuming session: %s", "sid")
try:
    {}["missing"]
except KeyError:
    chat.exception("[CHAT] Turn %s failed thread=%s", "tid", "th")
logging.getLogger("daphne.server").warning("not one of ours")
logging.getLogger("django.request").error("a request failed")
"""
    done = run_settings({"OMNI_LOG_FORMAT": "json", "OMNI_DATA_DIR": str(tmp_path)}, code)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(raw) for raw in done.stderr.splitlines()]
    assert [line["logger"] for line in lines] == [
        "omni.chat", "omni.chat", "omni.chat", "daphne.server", "django.request"]
    assert "turnId" not in lines[0]
    ids = {"turnId": "tid", "threadId": "th", "resourceId": "res", "pid": 4242}
    assert lines[1].items() >= {"message": "[CHAT] Resuming session: sid", **ids}.items()
    assert lines[2].items() >= ids.items() and lines[2]["level"] == "ERROR"
    assert lines[2]["traceback"].endswith("KeyError: 'missing'")
    # the default stays text
    done = run_settings({"OMNI_DATA_DIR": str(tmp_path)}, code)
    assert done.returncode == 0 and "INFO omni.chat [CHAT] Resuming session: sid\n" in done.stderr
    assert not done.stderr.startswith("{")
    done = run_settings({"OMNI_LOG_FORMAT": "yaml", "OMNI_DATA_DIR": str(tmp_path)}, "")
    assert done.returncode != 0 and "OMNI_LOG_FORMAT must be text or json" in done.stderr


# --- real turns (the SDK and CLI, the offline model) -----------------------------------

body = turn_bodies("lena")


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
async def test_a_turns_lines_carry_its_ids(offline_chat, json_log):
    from chat_app.turns import start_turn

    first = await start_turn(None, body("Remember the lighthouse", "log-a"))
    assert (await events_of(first))[-1]["type"] == "done"
    # a follow-up (warm, resumed) and another thread's turn, at the same time
    again = await start_turn(None, body("What did I say?", "log-a"))
    other = await start_turn(None, body("Hello", "log-b", resource="mira"))
    results = await asyncio.gather(events_of(again), events_of(other))
    assert all(events[-1]["type"] == "done" for events in results)
    session_id = results[0][0]["sessionId"]

    lines = json_log.lines()  # every line parses
    turns = {first.turn_id: ("log-a", "lena"), again.turn_id: ("log-a", "lena"),
             other.turn_id: ("log-b", "mira")}
    for line in lines:
        assert TIME.match(line["time"]) and line["level"] and line["logger"].startswith("omni")
        if "turnId" in line:
            assert (line["threadId"], line["resourceId"]) == turns[line["turnId"]], line
    resumed = [line for line in lines if line["message"] == f"[CHAT] Resuming session: {session_id}"]
    assert [line["turnId"] for line in resumed] == [again.turn_id]
    saved = [line for line in lines if line["message"].startswith("[CHAT] Saved session mapping")]
    for turn in (first, again, other):  # each turn's saves (run in a thread) are its own
        thread = turns[turn.turn_id][0]
        mine = [line for line in saved if line.get("turnId") == turn.turn_id]
        assert mine and all(f"thread={thread} " in line["message"] for line in mine), saved
    assert all("turnId" in line for line in saved), saved


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
async def test_a_failing_turn_logs_its_traceback_once_under_the_id_the_client_gets(
        offline_chat, json_log, monkeypatch):
    from chat_app.turns import runner, start_turn

    async def broken(*args, **kwargs):
        raise RuntimeError("could not connect to db.internal.example:5432")

    monkeypatch.setattr(runner.store, "save", broken)
    turn = await start_turn(None, body("Hello", "log-fail"))
    error = (await events_of(turn))[-1]
    assert error["type"] == "error" and error["code"] == "turn_failed"
    assert "db.internal" not in error["message"]
    # the id in the client's message finds the one line with the traceback
    [turn_id] = re.findall(r"[0-9a-f]{32}", error["message"])
    assert turn_id == turn.turn_id == error["turnId"]
    with_traceback = [line for line in json_log.lines() if "traceback" in line]
    assert len(with_traceback) == 1, with_traceback
    [line] = with_traceback
    assert line["turnId"] == turn_id and line["threadId"] == "log-fail" and line["resourceId"] == "lena"
    assert line["level"] == "ERROR" and line["logger"] == "omni.chat"
    assert line["message"] == f"[CHAT] Turn {turn_id} failed thread=log-fail"
    assert line["traceback"].endswith("RuntimeError: could not connect to db.internal.example:5432")


@pytest.mark.django_db(transaction=True)
@pytest.mark.sdk
async def test_no_line_of_a_warm_clients_callbacks_names_an_earlier_turn(offline_chat, json_log):
    """The SDK runs a client's callbacks (tools, approvals) in tasks started
    when its CLI connected, in the context of the turn that connected it: a
    later turn on that warm client never lends them the earlier turn's ids."""
    from chat_app.turns import start_turn

    first = await start_turn(None, body("A conversation to keep", "log-warm"))
    assert (await events_of(first))[-1]["type"] == "done"
    second = await start_turn(None, body('Delete it [tool delete_conversation {"threadId": "log-warm"}]',
                                         "log-warm"))

    async def until_waiting():
        async for event in second.listen():
            if event["type"] == "approval_request":
                return

    await asyncio.wait_for(until_waiting(), 30)
    await second.interrupt()  # denies the call; the turn ends
    await asyncio.wait_for(events_of(second), 30)
    waits = [line for line in json_log.lines() if "waits for approval" in line["message"]]
    assert waits, json_log.text[-3000:]
    for line in json_log.lines():
        named = re.search(r"\(turn ([0-9a-f]{32})\)", line["message"])
        if named and "turnId" in line:
            assert line["turnId"] == named.group(1), line
        if "turnId" in line:
            assert line["turnId"] in (first.turn_id, second.turn_id)
