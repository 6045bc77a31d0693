"""Which database connections persist.

The embedded libSQL file's and PostgreSQL's connections persist
(``CONN_MAX_AGE=None``, see :mod:`omni.db.urls`; PostgreSQL's are
health-checked before reuse) for the one long-lived thread that needs it:
the thread the turns and websocket consumers run their ORM work on
(asgiref's shared executor), where reopening the file on every turn cost
~6 ms and a PostgreSQL connect and login a round trip or more. An HTTP
request runs its ORM work on an executor thread of its own that ends with
the request; this receiver closes that thread's connections when the
request finishes, as Django does with ``CONN_MAX_AGE=0``, instead of leaving
them open until garbage collection.
"""

from django.db import connections


def close_request_connections(**kwargs) -> None:
    """``request_finished``: close this (request) thread's persistent connections."""
    for connection in connections.all(initialized_only=True):
        if connection.settings_dict.get("CONN_MAX_AGE") is None and not connection.in_atomic_block:
            connection.close()
