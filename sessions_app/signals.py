"""Signals of the session service.

``thread_deleted(sender=SessionMapping, thread_id, resource_id, session_id)``
is sent (``asend``: receivers may be coroutines) by
:func:`sessions_app.services.delete_session` once a thread's mapping and
transcript rows are gone: whoever holds the conversation elsewhere (the chat
app's running turns, warm Claude processes and thread leases, on every
worker) lets go of it.

``sessions_pruned(sender=SessionMapping, cutoff)`` is sent by
``manage.py prune_sessions`` after it deleted what was older than ``cutoff``:
other apps prune what they keep per thread. A receiver returns how many
rows it deleted.

``tool_call_decided(sender=ToolCall, decision)`` is sent once per decided
call (a person, Stop, the timeout), by :mod:`sessions_app.toolcalls`.
"""

from django.dispatch import Signal

thread_deleted = Signal()
tool_call_decided = Signal()
sessions_pruned = Signal()
