from django.apps import AppConfig


class DatabaseConfig(AppConfig):
    """The project's database layer (``DATABASE_URL``, the libSQL engine, which
    connections persist): an app only so that it wires its own signal."""

    name = "omni.db"
    label = "omni_db"
    verbose_name = "Database"

    def ready(self):
        from django.core.signals import request_finished

        from .connections import close_request_connections

        # A request's own connections close with it; the turns' thread keeps its own.
        request_finished.connect(close_request_connections, dispatch_uid="omni.db.close_request_connections")
