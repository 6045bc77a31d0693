from django.apps import AppConfig


class ChatAppConfig(AppConfig):
    name = "chat_app"
    verbose_name = "Chat"

    def ready(self):
        from sessions_app.signals import sessions_pruned, thread_deleted, tool_call_decided

        from . import checks, receivers  # noqa: F401  (checks: registers the workspace check)
        from .streams import announce_started, hub
        from .turns import registry

        # The stream hub answers for this process's turns on the channel
        # layer; then the followers waiting for a thread's next turn (a
        # continuation after a decision) are woken. In this order. A turn
        # that freed its thread starts the thread's next queued message.
        from .queue import turn_freed

        for hooks, hook in ((registry.started, hub.attach), (registry.started, announce_started),
                            (registry.forgotten, hub.forgotten), (registry.freed, turn_freed)):
            if hook not in hooks:
                hooks.append(hook)

        thread_deleted.connect(receivers.thread_deleted, weak=False,
                               dispatch_uid="chat_app.receivers.thread_deleted")
        sessions_pruned.connect(receivers.sessions_pruned, weak=False,
                                dispatch_uid="chat_app.receivers.sessions_pruned")
        tool_call_decided.connect(receivers.tool_call_decided, weak=False,
                                  dispatch_uid="chat_app.receivers.tool_call_decided")
