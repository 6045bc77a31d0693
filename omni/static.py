"""WhiteNoise as an async middleware.

WhiteNoise's middleware is sync-only, so under ASGI Django runs it in a
worker thread that calls back into the event loop for the rest of the
chain: every request hops threads twice, and a request that arrives while
daphne shuts down leaves that thread waiting for a loop that has stopped, so
the process never exits (a browser page that reloads its data as the server
restarts does exactly this). This subclass keeps WhiteNoise's file lookup
and responses and runs the chain on the loop: static files are served from a
thread, everything else is awaited directly.
"""

from asgiref.sync import markcoroutinefunction, sync_to_async
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        super().__init__(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request):
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file, thread_sensitive=False)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)
