"""The server's sweep of orphaned uploads (contract §11): an upload never
sent in a message is deleted after ``OMNI_ATTACHMENT_ORPHAN_HOURS``.

Every worker runs one (started and stopped by ``chat_app.lifecycle``),
every ``OMNI_ATTACHMENT_SWEEP_SECONDS`` (0 or less: none). The first sweep
comes after a random part of that interval, so workers started together do
not sweep together. With nothing to delete a sweep is one indexed query
(``idx_attachment_orphan``). Several workers sweeping at once are safe
(:func:`services.prune_orphans_sync`: rows are locked and deleted in a
transaction, a file already gone is not an error). ``prune_sessions``
deletes the same uploads from cron.
"""

from __future__ import annotations

import asyncio
import logging
import random

from asgiref.sync import sync_to_async
from django.conf import settings

from sessions_app.background import Background

from . import services

log = logging.getLogger("omni.attachments")

def start() -> None:
    """Start this worker's sweep (once per event loop). It first checks
    that the storage can be reached (S3: an error in the log if not)."""
    _sweeper.start()


async def stop() -> None:
    await _sweeper.stop()


async def sweep() -> int:
    """Delete the orphaned uploads now; returns how many."""
    return await sync_to_async(services.prune_orphans_sync)()


def check_storage_sync() -> str | None:
    """None if the attachment storage takes requests, else what is wrong
    (for S3: ``HeadBucket`` with the server's credentials)."""
    store = services.storage()
    head = getattr(store, "head_bucket", None)
    if head is None:
        return None
    try:
        head()
    except Exception as exc:
        from .storage import describe

        return f"{describe(settings.STORAGES['attachments'])} cannot be reached: {exc}"
    return None


async def _check_storage() -> None:
    problem = await sync_to_async(check_storage_sync, thread_sensitive=False)()
    if problem:
        log.error("[ATTACHMENTS] %s. Uploads and downloads answer 503 until it can "
                  "(check OMNI_ATTACHMENT_STORAGE, AWS_ENDPOINT_URL_S3 and the AWS credentials).", problem)


async def _sweep_forever() -> None:
    interval = settings.OMNI_ATTACHMENT_SWEEP_SECONDS
    await _check_storage()
    if interval <= 0:
        return
    await asyncio.sleep(random.uniform(0, interval))
    while True:
        try:
            await sweep()
        except asyncio.CancelledError:
            raise
        except Exception:  # the database or the store is down: try again next time
            log.warning("attachments: the sweep of orphaned uploads failed", exc_info=True)
        await asyncio.sleep(interval)


_sweeper = Background(_sweep_forever)
