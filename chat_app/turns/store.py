"""Moving and saving a turn's session: the database is the truth.

* :func:`adopt_session`: before a thread's own turn resumes cold, its stored
  session moves to this process's project key (the CLI's project is its
  working directory), so the CLI resumes it from the store and its new lines
  land next to the old ones. Only under the thread's lease.
* a fork *reads* its parent where it is stored and never moves it
  (:func:`chat_app.sdk.session_store` with ``fork_of``): the parent may be
  running a turn on another worker, under another project key, at this very
  moment.
* :func:`save` writes the mapping through the session service; only the
  first save of a turn that started without a mapping may create it, so a
  turn never brings back a thread deleted while it ran.
* :func:`erase_if_orphaned`: a turn that ends without its mapping (deleted
  meanwhile, or a new thread that lost the race for its id) leaves no
  transcript behind.
"""

from __future__ import annotations

import functools
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from django.db import close_old_connections, transaction

from sessions_app import selectors, services
from sessions_app.outages import outlasting, reconnecting, within

from .. import leases
from ..sdk import workspace_dir

log = logging.getLogger("omni.chat")


async def adopt_session(session_id: str) -> bool:
    """Move a stored session to this process's project key; True if moved."""
    if not settings.OMNI_SESSION_STORE:
        return False
    from claude_agent_sdk import project_key_for_directory
    from sessions_app.transcripts import rekey_session

    key = project_key_for_directory(str(workspace_dir()))
    moved = await sync_to_async(reconnecting)(rekey_session, session_id, key)
    if moved:
        log.info("[CHAT] Adopted stored session %s into project %s", session_id, key)
    return bool(moved)


async def save(spec, session_id: str, *, create: bool, **fields):
    """Save the turn's mapping (see :func:`sessions_app.services.save_session`).
    ``create``: this save may insert the mapping (the first save of a new
    thread or a fork); otherwise a mapping that is gone raises
    :class:`~sessions_app.services.ThreadDeleted`."""
    return await services.save_session(
        spec.thread_id, spec.resource_id, session_id, create=create, **fields)


def _finish_sync(spec, session_id: str, lease, *, user_message, agent, assistant_message,
                 turn_record, drop_local: bool) -> None:
    try:
        with transaction.atomic():  # the lease's end, the mapping and the record together
            if lease is not None and not lease.release_if_held_sync():
                # Lost, unless an earlier try of this save committed all of it
                # and its connection broke before saying so (see finish).
                if turn_record is None or not selectors.turn_recorded_sync(turn_record["turn_id"]):
                    raise leases.LeaseLost(
                        f"the lease of thread {spec.thread_id!r} (token {lease.token}) was lost")
            else:
                services.finish_turn_sync(
                    spec.thread_id, spec.resource_id, session_id, agent=agent, user_message=user_message,
                    assistant_message=assistant_message, turn_record=turn_record)
        if lease is not None:
            lease.released = True
        if drop_local and settings.OMNI_SESSION_STORE:
            try:
                services.drop_mirrored_local_transcript(session_id)
            except OSError:
                log.warning("could not drop the local transcript of %s", session_id, exc_info=True)
    finally:
        close_old_connections()  # as at a request's end: a broken connection goes


async def finish(spec, session_id: str, lease, **fields) -> None:
    """A turn's last save in one trip to the database thread and one
    transaction: the lease let go if still held (else
    :class:`~chat_app.leases.LeaseLost`), the mapping updated
    (:func:`sessions_app.services.finish_turn_sync`, with the turn's record);
    then the CLI's local copy dropped (``drop_local``: its client is not kept).

    A connection the database dropped is replaced and the save runs again
    (it is idempotent: the turn's record is keyed by its id); while the
    database cannot be reached at all, the save is tried again until it is
    back or the thread's lease runs out, then
    :class:`~sessions_app.outages.ConnectionLost` is raised (nothing saved,
    the lease lapsing on its own)."""
    call = sync_to_async(functools.partial(reconnecting, _finish_sync, spec, session_id, lease, **fields))
    seconds_left = lease.remaining if lease is not None else within(leases.lease_seconds())
    await outlasting(call, seconds_left, f"the last save of thread {spec.thread_id}")


async def erase_if_orphaned(session_id: str) -> None:
    """Erase a session no mapping points at (rows and local files)."""
    try:
        if await services.erase_orphaned_session(session_id):
            log.info("[CHAT] Erased session %s: its thread is gone", session_id)
    except Exception:
        log.warning("could not erase the orphaned session %s", session_id, exc_info=True)
