from django.apps import AppConfig


class ChatAppConfig(AppConfig):
    name = "chat_app"
    verbose_name = "Chat"

    def ready(self):
        from sessions_app.signals import thread_deleted

        from .pool import pool

        def drop_warm_client(sender, thread_id, resource_id, **kwargs):
            # A deleted thread leaves no process holding its conversation.
            pool.forget((resource_id, thread_id))

        thread_deleted.connect(drop_warm_client, weak=False, dispatch_uid="chat_app.pool.forget")
