"""A minimal Hrana server over a local SQLite file, for tests only.

It stands in for a libSQL server (sqld, Turso), which cannot be installed
here, so the remote path of ``omni.db.libsql`` (``ws://`` URLs through
``libsql_client.dbapi2``) can run for real. It is not a libSQL server: no
replication, no HTTP API, no JWT checking beyond comparing the token, and
every statement runs on the stdlib :mod:`sqlite3`.

It implements exactly what libsql-client 0.3.1's WebSocket client sends
(``libsql_client/hrana/conn.py``, ``dbapi2/hrana.py``):

* the ``hrana2`` (and ``hrana1``) WebSocket subprotocol, text JSON messages;
* ``hello`` with ``jwt``, answered ``hello_ok`` or ``hello_error`` (a wrong
  or missing token when one is configured);
* ``request`` messages, answered ``response_ok`` / ``response_error``, of the
  types ``open_stream``, ``close_stream``, ``execute``, ``batch`` (step
  conditions ``ok``, ``error``, ``not``, ``and``, ``or``), ``sequence``,
  ``store_sql`` and ``close_sql``. ``describe`` is not implemented: the
  client never sends it;
* values ``{"type": "null" | "integer" | "float" | "text" | "blob"}``;
  statement results ``cols``/``rows``/``affected_row_count``/
  ``last_insert_rowid``; errors ``{"message", "code"}`` with SQLite's
  extended error names (``SQLITE_CONSTRAINT_UNIQUE``...).

Each stream is its own ``sqlite3`` connection in autocommit mode, so a
``BEGIN`` ... ``COMMIT`` spans requests on one stream, as on sqld. Requests of
one WebSocket run in order, in a worker thread, so one client waiting on a
lock does not block the others.

    server = start_hrana_server("/tmp/db.sqlite3", token="secret")
    server.url  # "ws://127.0.0.1:PORT"
    server.stop()
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sqlite3
import threading
from collections import Counter

from aiohttp import WSCloseCode, WSMsgType, web

SUBPROTOCOLS = ("hrana2", "hrana1")


class HranaError(Exception):
    def __init__(self, message: str, code: str = "HRANA_PROTO_ERROR"):
        super().__init__(message)
        self.proto = {"message": message, "code": code}


# --- values -----------------------------------------------------------------


def value_from_proto(value: dict):
    kind = value["type"]
    if kind == "null":
        return None
    if kind == "integer":
        return int(value["value"])
    if kind == "float":
        return float(value["value"])
    if kind == "text":
        return value["value"]
    if kind == "blob":
        return base64.b64decode(value["base64"])
    raise HranaError(f"unknown value type {kind!r}")


def value_to_proto(value) -> dict:
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    return {"type": "blob", "base64": base64.b64encode(value).decode()}


def sql_error(exc: sqlite3.Error) -> dict:
    return {"message": str(exc), "code": getattr(exc, "sqlite_errorname", None) or "SQLITE_ERROR"}


# --- one WebSocket: its streams and stored SQL --------------------------------


class Session:
    """The state of one client connection. Its methods block (sqlite3) and
    run in a worker thread, one request at a time."""

    def __init__(self, db_path: str, seen: Counter):
        self.db_path = db_path
        self.seen = seen
        self.streams: dict[int, sqlite3.Connection] = {}
        self.sqls: dict[int, str] = {}

    def close(self) -> None:
        for conn in self.streams.values():
            conn.close()  # an open transaction is rolled back
        self.streams.clear()

    def handle(self, request: dict) -> dict:
        kind = request["type"]
        self.seen[kind] += 1
        handler = getattr(self, f"req_{kind}", None)
        if handler is None:
            raise HranaError(f"unsupported request type {kind!r}")
        return {"type": kind, **handler(request)}

    def stream(self, request: dict) -> sqlite3.Connection:
        try:
            return self.streams[request["stream_id"]]
        except KeyError:
            raise HranaError(f"no stream {request['stream_id']}", "STREAM_CLOSED") from None

    def sql_text(self, holder: dict) -> str:
        if "sql_id" in holder and holder["sql_id"] is not None:
            if holder["sql_id"] not in self.sqls:
                raise HranaError(f"no stored SQL {holder['sql_id']}", "SQL_NOT_FOUND")
            return self.sqls[holder["sql_id"]]
        return holder["sql"]

    def req_open_stream(self, request: dict) -> dict:
        if request["stream_id"] in self.streams:
            raise HranaError(f"stream {request['stream_id']} already open")
        conn = sqlite3.connect(self.db_path, timeout=5, isolation_level=None, check_same_thread=False)
        self.streams[request["stream_id"]] = conn
        return {}

    def req_close_stream(self, request: dict) -> dict:
        conn = self.streams.pop(request["stream_id"], None)
        if conn is not None:
            conn.close()
        return {}

    def req_store_sql(self, request: dict) -> dict:
        self.sqls[request["sql_id"]] = request["sql"]
        return {}

    def req_close_sql(self, request: dict) -> dict:
        self.sqls.pop(request["sql_id"], None)
        return {}

    def req_execute(self, request: dict) -> dict:
        try:
            return {"result": self.execute(self.stream(request), request["stmt"])}
        except sqlite3.Error as exc:
            raise HranaError(**sql_error(exc)) from exc

    def req_sequence(self, request: dict) -> dict:
        conn = self.stream(request)
        try:
            # Statement by statement rather than executescript(), which
            # would COMMIT a transaction the stream has open.
            pending = ""
            for piece in self.sql_text(request).split(";"):
                pending += piece + ";"
                if sqlite3.complete_statement(pending):
                    if pending.strip(" \t\r\n;"):
                        conn.execute(pending)
                    pending = ""
        except sqlite3.Error as exc:
            raise HranaError(**sql_error(exc)) from exc
        return {}

    def req_batch(self, request: dict) -> dict:
        conn = self.stream(request)
        results: list[dict | None] = []
        errors: list[dict | None] = []
        for step in request["batch"]["steps"]:
            result = error = None
            if self.condition(step.get("condition"), results, errors):
                try:
                    result = self.execute(conn, step["stmt"])
                except sqlite3.Error as exc:
                    error = sql_error(exc)
                except HranaError as exc:
                    error = exc.proto
            results.append(result)
            errors.append(error)
        return {"result": {"step_results": results, "step_errors": errors}}

    def condition(self, cond: dict | None, results: list, errors: list) -> bool:
        if cond is None:
            return True
        kind = cond["type"]
        if kind == "ok":
            return results[cond["step"]] is not None
        if kind == "error":
            return errors[cond["step"]] is not None
        if kind == "not":
            return not self.condition(cond["cond"], results, errors)
        if kind == "and":
            return all(self.condition(c, results, errors) for c in cond["conds"])
        if kind == "or":
            return any(self.condition(c, results, errors) for c in cond["conds"])
        raise HranaError(f"unknown batch condition {kind!r}")

    def execute(self, conn: sqlite3.Connection, stmt: dict) -> dict:
        sql = self.sql_text(stmt)
        args = [value_from_proto(v) for v in stmt.get("args") or ()]
        named = {
            # Hrana names may carry their prefix (":name"); sqlite3 wants none.
            arg["name"].lstrip(":@$"): value_from_proto(arg["value"])
            for arg in stmt.get("named_args") or ()
        }
        if args and named:
            raise HranaError("both positional and named arguments", "ARGS_INVALID")
        changes = conn.total_changes
        cursor = conn.execute(sql, named or args)
        rows = cursor.fetchall()
        return {
            "cols": [{"name": col[0], "decltype": None} for col in cursor.description or ()],
            "rows": [[value_to_proto(v) for v in row] for row in rows] if stmt.get("want_rows", True) else [],
            "affected_row_count": conn.total_changes - changes,
            "last_insert_rowid": str(cursor.lastrowid) if cursor.lastrowid else None,
        }


# --- the WebSocket endpoint ----------------------------------------------------


class HranaServer:
    def __init__(self, db_path: str, token: str | None = None):
        self.db_path = str(db_path)
        self.token = token
        self.seen: Counter = Counter()  # request types served, for tests
        self.sockets: set[web.WebSocketResponse] = set()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hrana-server", daemon=True)
        self._runner: web.AppRunner | None = None

    async def websocket(self, http_request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, autoping=True)
        await ws.prepare(http_request)
        self.sockets.add(ws)
        session = Session(self.db_path, self.seen)
        authenticated = False
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"Only text messages")
                    break
                message = json.loads(msg.data)
                if message["type"] == "hello":
                    authenticated = self.token is None or message.get("jwt") == self.token
                    if authenticated:
                        await ws.send_json({"type": "hello_ok"})
                    else:
                        error = {"message": "Authentication failed: bad token", "code": "AUTH_JWT_INVALID"}
                        await ws.send_json({"type": "hello_error", "error": error})
                        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"Authentication failed")
                        break
                elif message["type"] == "request" and authenticated:
                    await ws.send_json(await self.respond(session, message))
                else:
                    await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"Unexpected message")
                    break
        finally:
            self.sockets.discard(ws)
            await asyncio.to_thread(session.close)
        return ws

    @staticmethod
    async def respond(session: Session, message: dict) -> dict:
        request_id = message["request_id"]
        try:
            response = await asyncio.to_thread(session.handle, message["request"])
        except HranaError as exc:
            return {"type": "response_error", "request_id": request_id, "error": exc.proto}
        except Exception as exc:  # a server bug: report it, keep serving
            error = {"message": f"{type(exc).__name__}: {exc}", "code": "SERVER_ERROR"}
            return {"type": "response_error", "request_id": request_id, "error": error}
        return {"type": "response_ok", "request_id": request_id, "response": response}

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.websocket)
        app.on_shutdown.append(self._close_sockets)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"ws://127.0.0.1:{sock.getsockname()[1]}"

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    def start(self) -> HranaServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def start_hrana_server(db_path, token: str | None = None) -> HranaServer:
    """Serve ``db_path`` over Hrana at ``server.url`` until ``server.stop()``."""
    return HranaServer(db_path, token).start()
