"""``DATABASE_URL`` to a Django ``DATABASES["default"]`` entry (contract §2).

* unset: the embedded libSQL file ``<OMNI_DATA_DIR>/sessions.db``
* ``file:PATH`` or a plain path: an embedded libSQL file
* ``libsql://``, ``ws://``, ``wss://`` (``?authToken=``): a libSQL server
* ``postgres://``, ``postgresql://``: PostgreSQL through psycopg 3
"""

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

LIBSQL_ENGINE = "omni.db.libsql"
# Seconds a PostgreSQL connection attempt may take (libpq's connect_timeout;
# a URL's own ``?connect_timeout=`` wins). Without it a black-holed database
# host holds each attempt, and the thread making it, for about two minutes.
POSTGRES_CONNECT_TIMEOUT = 3


def libsql_file(path: Path) -> dict:
    path = Path(path).expanduser()
    return {
        "ENGINE": LIBSQL_ENGINE,
        "NAME": str(path),
        # Connections persist (per thread): the turns' thread keeps one, so a
        # turn's first query skips opening the file, and the WAL is not
        # checkpointed and deleted each time a last connection closes (both
        # together were ~6 ms of every turn). A request's own connections
        # close when it finishes (omni.db.connections).
        "CONN_MAX_AGE": None,
        # Tests run on a file of their own beside it, never in memory:
        # the engine under test is the one that serves.
        "TEST": {"NAME": str(path.with_name(f"test_{path.name}"))},
    }


def database_from_url(url: str | None, data_dir: Path) -> dict:
    if not url:
        return libsql_file(data_dir / "sessions.db")
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("postgres", "postgresql", "pgsql"):
        # Persistent and health-checked, like the libSQL file's: the turns'
        # thread keeps its connection (no connect and login per turn) and
        # a broken one is replaced before its next use; requests close
        # theirs when they finish (omni.db.connections).
        config = dj_database_url.parse(url, conn_max_age=None, conn_health_checks=True)
        config["ENGINE"] = "django.db.backends.postgresql"
        config.setdefault("OPTIONS", {}).setdefault("connect_timeout", POSTGRES_CONNECT_TIMEOUT)
        return config
    if scheme in ("libsql", "ws", "wss"):
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        token = query.pop("authToken", None)
        name = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        return {"ENGINE": LIBSQL_ENGINE, "NAME": name, "OPTIONS": {"auth_token": token}}
    if scheme == "file":
        return libsql_file(Path(url[len("file:"):].removeprefix("//")))
    if scheme == "" or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return libsql_file(Path(url))
    raise ImproperlyConfigured(f"DATABASE_URL scheme {scheme!r} is not supported")
