"""``GET /api/health`` (contract §4): is this worker fit to take traffic?

Cheap enough for a load balancer to poll every second: one ``SELECT 1`` and
one Redis ``PING``, each given about a second. No credentials, no data: the
checks' names and ``ok``/``off``/``error``, and this process's live CLI counts.
"""

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.db import connections
from django.http import JsonResponse
from ninja import Router, Schema

from chat_app import streams
from chat_app.turns import process_counts

log = logging.getLogger("omni.api")
router = Router(tags=["health"])
CHECK_SECONDS = 1.0


class HealthChecks(Schema):
    database: str
    channelLayer: str
    turns: str


class HealthOut(Schema):
    status: str
    checks: HealthChecks
    processes: dict[str, int | bool]


def _database() -> None:
    # A thread of its own (not the shared ORM thread a hung database would
    # block) and a connection closed after, so each poll tests reachability.
    connection = connections["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


async def check_database() -> str:
    await sync_to_async(_database, thread_sensitive=False)()
    return "ok"


async def check_channel_layer() -> str:
    layer = streams.layer()
    if layer is None or not streams.distributed():
        return "off"  # the in-memory layer: one process, nothing to reach
    if hasattr(layer, "connection"):  # channels_redis
        await layer.connection(0).ping()
    else:  # another backend: a round trip through it
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "omni.health"})
        await layer.receive(channel)
    return "ok"


async def run_check(name: str, check) -> str:
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            return await check()
    except Exception as exc:
        log.error("health: %s check failed: %s", name, exc)
        return "error"


@router.get("/health", auth=None, response={200: HealthOut, 503: HealthOut},
            summary="Health of this server process")
async def health(request):
    """`status` is `ok` when every check is `ok` (or `off`: no channel layer to reach); otherwise
    the answer is 503 and the failing check says `error` (`turns` says `draining` while the
    process is shutting down and takes no new turns). `processes` counts this process's
    live Claude CLI processes: `running` (turns in progress), `warm` (idle warm clients),
    `spare` (started for new threads) and `budget`, their limit."""
    database, layer = await asyncio.gather(
        run_check("database", check_database), run_check("channelLayer", check_channel_layer))
    counts = process_counts()
    # A worker that is stopping (SIGTERM) takes no new turns: the balancer
    # should send them elsewhere.
    turns = "draining" if counts.get("draining") else "ok"
    checks = {"database": database, "channelLayer": layer, "turns": turns}
    ok = all(value in ("ok", "off") for value in checks.values())
    body = {"status": "ok" if ok else "error", "checks": checks, "processes": counts}
    return JsonResponse(body, status=200 if ok else 503)
