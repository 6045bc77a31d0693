"""A libSQL database engine for Django 5.2.

Django's own SQLite backend does all the SQL work here: schema editor,
introspection, operations, features and creation are inherited unchanged.
Only the connection differs, and it comes from libsql-client, the driver of
the published ``django-libsql`` package:

* ``NAME`` a file path (or ``file:`` URI): the standard :mod:`sqlite3`
  module, which is what libsql-client itself uses for local files. The file
  runs in WAL mode with a busy timeout and ``BEGIN IMMEDIATE`` transactions,
  so several server processes can share it.
* ``NAME`` a ``libsql://``, ``ws://`` or ``wss://`` URL: a libSQL server
  (sqld, Turso) over the Hrana protocol, through
  :mod:`libsql_client.dbapi2`. ``OPTIONS["auth_token"]`` (or an
  ``authToken`` query parameter) authenticates. A remote connection cannot
  register Python SQL functions, so the project relies on none: no
  ``__month``/``__day``/``__date``/``__time`` lookups, ``Extract``/``Trunc``,
  ``dates()``, ``date_hierarchy``, datetime-and-timedelta ``F()``
  arithmetic, ``__regex``, ``order_by("?")``, ``StdDev``/``Variance`` or the
  hash and padding functions (``__year`` is a range and works).
  ``tests/test_engine_remote.py`` runs this path against a Hrana server.

Why not django-libsql 0.1.3: on Django 5.2 it insists on a ``file:`` URI for
local files, then hands Django's ``sqlite3.Cursor`` subclass to a
non-sqlite3 connection (``TypeError: connection must be instance of
'Connection'``), and its schema editor still uses the removed
``index_together``.
"""

from collections.abc import Mapping
from contextlib import suppress
from itertools import islice, tee
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.db.backends.sqlite3 import base as sqlite3_base
from libsql_client import dbapi2

REMOTE_SCHEMES = ("libsql", "ws", "wss")


def is_remote(name) -> bool:
    return urlsplit(str(name)).scheme in REMOTE_SCHEMES


def remote_url(name: str, auth_token: str | None) -> str:
    """The Hrana URL for ``name``: ``libsql://`` means ``wss://``; the token
    travels as the ``authToken`` query parameter libsql-client reads."""
    parts = urlsplit(name)
    scheme = "wss" if parts.scheme == "libsql" else parts.scheme
    query = dict(parse_qsl(parts.query))
    if auth_token:
        query["authToken"] = auth_token
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), ""))


class HranaCursorWrapper(dbapi2.Cursor):
    """Django's ``%s`` parameter style on a Hrana cursor (what
    ``SQLiteCursorWrapper`` does for sqlite3 cursors)."""

    def execute(self, query, params=None):
        if params is None:
            return super().execute(query)
        names = list(params) if isinstance(params, Mapping) else None
        query = sqlite3_base.SQLiteCursorWrapper.convert_query(self, query, param_names=names)
        return super().execute(query, params)

    def executemany(self, query, param_list):
        param_list, peek = tee(param_list, 2)
        first = next(peek, None)
        names = list(first) if isinstance(first, Mapping) else None
        query = sqlite3_base.SQLiteCursorWrapper.convert_query(self, query, param_names=names)
        return super().executemany(query, param_list)

    def fetchmany(self, size=None):
        # libsql-client's own fetchmany drops a row at every chunk boundary,
        # and Django reads results in chunks of 100.
        return list(islice(self, size if size and size > 0 else self.arraysize))


class HranaConnection(dbapi2.Connection):
    """libsql-client's remote connection, with one fix: it tracks
    ``in_transaction`` from statement keywords and takes ``ROLLBACK TO
    SAVEPOINT`` (a nested ``atomic()`` undoing itself) for the end of the
    transaction, so the outer ``atomic()`` would then never send ``COMMIT``."""

    def _update_in_transaction(self, statement):
        words = [token.upper() for token in statement.tokens[:3]]
        if words[0] == "ROLLBACK" and "TO" in words:
            return  # ROLLBACK [TRANSACTION] TO [SAVEPOINT] name
        super()._update_in_transaction(statement)


class DatabaseWrapper(sqlite3_base.DatabaseWrapper):
    display_name = "libSQL"

    @property
    def is_remote(self) -> bool:
        return is_remote(self.settings_dict["NAME"])

    def get_connection_params(self):
        options = self.settings_dict["OPTIONS"]
        if self.is_remote:
            # The parent sets self.transaction_mode and self.init_commands,
            # which atomic() and get_new_connection() read.
            super().get_connection_params()
            return {
                "database": remote_url(self.settings_dict["NAME"], options.get("auth_token")),
                "isolation_level": None,
                "check_same_thread": False,
                "factory": HranaConnection,
            }
        # Local file: a busy timeout and write locks taken at BEGIN, so a
        # second process waits instead of failing with "database is locked".
        options.setdefault("timeout", 20)
        options.setdefault("transaction_mode", "IMMEDIATE")
        return super().get_connection_params()

    def get_new_connection(self, conn_params):
        if self.is_remote:
            # No register_functions(): a remote connection cannot run Python.
            conn = dbapi2.connect(**conn_params)
            try:
                # The first request: a refused token fails here, not in
                # connect() (the client reads the handshake's answer late).
                conn.execute("PRAGMA foreign_keys = ON")
                for init_command in filter(None, map(str.strip, self.init_commands)):
                    conn.execute(init_command)
            except Exception:
                with suppress(Exception):
                    conn.close()  # else its event-loop thread and HTTP session leak
                raise
            return conn
        conn = super().get_new_connection(conn_params)
        if not self.is_in_memory_db():
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def create_cursor(self, name=None):
        if self.is_remote:
            return self.connection.cursor(factory=HranaCursorWrapper)
        return super().create_cursor(name)

    def is_in_memory_db(self):
        return not self.is_remote and super().is_in_memory_db()

    def is_usable(self):
        """Whether the connection still answers (SQLite's says True always):
        a libSQL server's connection breaks when the server restarts or the
        network drops it, and a file's when it was closed under Django. Run
        only after an error (``sessions_app.outages``, Django's
        ``close_if_unusable_or_obsolete``), never before each query."""
        if self.connection is None:
            return False
        try:
            self.connection.execute("SELECT 1")
        except Exception:
            return False
        return True
