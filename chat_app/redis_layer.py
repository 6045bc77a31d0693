"""The channel layer on Redis (``REDIS_URL``): ``channels_redis``'s, with
one change for Redis outages (issue 22, item 6).

After each message it receives, ``channels_redis`` drops the message's
backup copy in a task it never awaits; when Redis goes away at that moment
(or the task finds a pooled connection the restarted server closed) the
task's error is logged by asyncio as "Task exception was never retrieved",
with a traceback. Here it is a debug line: an outage is logged once, by
whoever waits on the layer (:data:`chat_app.streams.layer_health`). The
backup left behind is harmless: a message handed out twice is dropped by
its reader (followers keep events by ``seq``; the hub answers a
``subscribe`` again with the same events).
"""

import logging

from channels_redis.core import RedisChannelLayer as ChannelsRedisLayer

log = logging.getLogger("omni.chat")


class RedisChannelLayer(ChannelsRedisLayer):
    async def _clean_receive_backup(self, index, channel):
        try:
            await super()._clean_receive_backup(index, channel)
        except Exception as exc:
            log.debug("channel layer: could not drop a received message's backup: %s", exc)
