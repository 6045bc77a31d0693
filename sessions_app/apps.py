from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    label = "sessions_app"
    verbose_name = "Chat sessions"

    def ready(self):
        from django.core.signals import request_finished

        from omni.db.connections import close_request_connections

        from . import checks  # noqa: F401  (registers the deploy checks)

        # A request's own connections close with it; the turns' thread keeps its own.
        request_finished.connect(close_request_connections, dispatch_uid="omni.db.close_request_connections")
