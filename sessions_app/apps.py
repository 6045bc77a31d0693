from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    label = "sessions_app"
    verbose_name = "Chat sessions"

    def ready(self):
        from . import checks  # noqa: F401  (registers the deploy checks)
