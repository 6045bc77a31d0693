"""Structured logs (``OMNI_LOG_FORMAT=json``) and the ids that tie a line to its turn.

A turn binds its ids once, at the start of its task (``bind_turn``); every
line logged in that task from then on, and in the tasks it starts later
(the pool's, the SDK's, the tools'), carries them::

    logs.bind_turn(turn)           # turnId, threadId, resourceId
    logs.bind(pid=cli_pid)         # the CLI's pid, once known
    logs.bind_caller(caller)       # an SDK callback (a tool): the turn it serves
    with logs.bound(turn_id=...):  # for a block only
        ...

The ids live in a :class:`contextvars.ContextVar`: a binding belongs to the
asyncio task (or thread) that made it and to the tasks started from it
afterwards, never to a sibling. :class:`ContextFilter` copies them onto each
log record (as ``turnId``, ``threadId``, ``resourceId``, ``pid``) and
:class:`JsonFormatter` writes one JSON object per record, on one line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "omni.chat",
     "message": "[CHAT] Resuming session: ...", "turnId": "...", "threadId": "...",
     "resourceId": "...", "pid": 1234}

and an exception's traceback as its ``traceback`` field (newlines escaped,
so still one line). The text format (``OMNI_LOG_FORMAT=text``, the default)
is unchanged. ``omni/settings.py`` (``LOGGING``) wires both in.

A turn's binding lapses when the turn finishes: a warm CLI's SDK tasks were
started in the context of the turn that connected it, and must not lend that
turn's ids to the lines of a later turn on the same process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from contextvars import ContextVar, Token
from datetime import datetime, timezone

# Names ``bind`` takes -> the names a record and a JSON line carry.
FIELDS = {
    "turn_id": "turnId",
    "thread_id": "threadId",
    "resource_id": "resourceId",
    "pid": "pid",
}
OUTPUT = tuple(FIELDS.values())
IDS = {"turn_id", "thread_id", "resource_id"}
_TURN = "_turn"  # a weak reference to the bound turn: its ids lapse when it finishes

_context: ContextVar[dict] = ContextVar("omni_log_context", default={})


def bind(**fields) -> Token:
    """Add ``fields`` (``turn_id``, ``thread_id``, ``resource_id``, ``pid``)
    to this task's log context; ``None`` removes one. Returns the token that
    :func:`reset` takes to undo it (a task's own bindings end with the task)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown log field(s): {', '.join(sorted(unknown))}")
    merged = dict(_context.get())
    if fields.keys() & IDS:
        merged.pop(_TURN, None)  # new ids: no longer (only) the bound turn's
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return _context.set(merged)


def reset(token: Token) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields):
    """``bind(**fields)`` for the block only."""
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def bind_turn(turn) -> Token:
    """Bind a turn's ids (``chat_app.turns.runner.Turn``: ``turn_id``,
    ``spec.thread_id``, ``spec.resource_id``) for the rest of its task. They
    lapse once the turn has finished (``turn.finished``)."""
    token = bind(turn_id=turn.turn_id, thread_id=turn.spec.thread_id,
                 resource_id=turn.spec.resource_id, pid=None)
    _context.get()[_TURN] = weakref.ref(turn)  # the dict is this binding's own
    return token


def bind_caller(caller) -> Token:
    """Bind the ids of the turn a tool call runs for (``chat_app.tools.Caller``:
    ``turn_id``, ``thread_id``, ``resource_id``), at the start of an SDK
    callback: the SDK runs each in a task of its own, started from the
    context of the turn that connected the CLI, not of the turn it serves."""
    return bind(turn_id=caller.turn_id, thread_id=caller.thread_id, resource_id=caller.resource_id)


def current() -> dict:
    """The log fields bound here, by their output names (``turnId``...)."""
    fields = _context.get()
    ref = fields.get(_TURN)
    if ref is not None:
        turn = ref()
        if turn is None or getattr(turn, "finished", False):
            return {}  # a finished turn's binding, seen from a task it started
    return {FIELDS[name]: value for name, value in fields.items() if name in FIELDS}


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (``record.turnId``...); lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if getattr(record, name, None) is None:  # an explicit ``extra=`` wins
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC),
    ``level``, ``logger``, ``message``, the ids of :class:`ContextFilter`
    when bound, the record's own ``fields`` (``extra={"fields": {...}}``,
    e.g. an access line's ``method``, ``path``, ``status``), ``traceback``
    when the record carries an exception and
    ``stack`` for ``stack_info``. ASCII only (other characters escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in OUTPUT:
            if (value := getattr(record, name, None)) is not None:
                line[name] = value
        for name, value in (getattr(record, "fields", None) or {}).items():
            line.setdefault(name, value)  # a record's own fields (``extra={"fields": {...}}``)
        if record.exc_info and record.exc_info[0] is not None:
            # cached like logging.Formatter does, for other handlers of the record
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def capture_stray_output() -> None:
    """With ``OMNI_LOG_FORMAT=json``, what would otherwise reach stderr as
    plain text becomes a log record too: Python warnings (``py.warnings``)
    and uncaught exceptions, of the main thread and of other threads
    (``omni.uncaught``, with their ``traceback``)."""
    import sys
    import threading

    logging.captureWarnings(True)
    uncaught = logging.getLogger("omni.uncaught")

    def excepthook(exc_type, exc, tb):
        uncaught.critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb))

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        uncaught.error("uncaught %s in thread %s", args.exc_type.__name__, name,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
