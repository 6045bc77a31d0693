"""Signals of the session service.

``thread_deleted(sender=SessionMapping, thread_id, resource_id, session_id)``
is sent by :func:`sessions_app.services.delete_session` once a thread's
mapping and transcript rows are gone: whoever holds the conversation
elsewhere (the chat app's warm Claude processes) lets go of it.
"""

from django.dispatch import Signal

thread_deleted = Signal()
