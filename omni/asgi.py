"""ASGI entry point: ``daphne omni.asgi:application`` serves HTTP, SSE and websockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omni.settings")
django_asgi_app = get_asgi_application()

from omni import daphne as daphne_options  # noqa: E402

daphne_options.configure()  # an oversized websocket frame closes with 1009

from omni import bodylimit  # noqa: E402

bodylimit.install()  # a request body over the limit is 413 before it is read

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat_app import lifecycle  # noqa: E402
from chat_app.routing import websocket_urlpatterns  # noqa: E402
from omni.auth import TokenAuthMiddleware  # noqa: E402
from omni.origins import BrowserOriginValidator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": BrowserOriginValidator(
            # the session's user, replaced by a token's (?token= or Bearer)
            AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
        ),
    }
)

# Under daphne: stop turns, warm clients and spares in order on SIGTERM.
lifecycle.install()
