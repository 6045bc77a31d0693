"""Websocket origin checking (contract §6), as Django's CSRF origin check
does for HTTP (``CsrfViewMiddleware``).

A browser's handshake carries ``Origin``: it is accepted when it is exactly
the page's own origin, ``<scheme>://<Host>`` (the scheme the request came
in on, ``ws`` as ``http`` and ``wss`` as ``https``, or what
``SECURE_PROXY_SSL_HEADER`` says behind a TLS proxy; the ``Host`` header,
which must be one of ``ALLOWED_HOSTS``), or one of ``CSRF_TRUSTED_ORIGINS``
(``OMNI_CSRF_TRUSTED_ORIGINS``, ``https://*.example.com`` included). So
another port or another scheme of the same host is another origin, refused.

A handshake with no ``Origin`` is let through: browsers always send one, so
only non-browser clients (which cannot be driven cross-site) omit it, and
they still authenticate.
"""

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.utils.http import is_same_domain


class Handshake(HttpRequest):
    """A websocket handshake seen as Django sees an HTTP request, for its
    ``scheme`` (honouring ``SECURE_PROXY_SSL_HEADER``) and ``get_host()``
    (``ALLOWED_HOSTS``, ``USE_X_FORWARDED_HOST``)."""

    def __init__(self, scope):
        super().__init__()
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").upper().replace("-", "_")
            value = value.decode("latin-1")
            key = "HTTP_" + key
            self.META[key] = f"{self.META[key]},{value}" if key in self.META else value
        if server := scope.get("server"):
            self.META["SERVER_NAME"], self.META["SERVER_PORT"] = server[0], str(server[1])
        self._transport_scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"

    def _get_scheme(self):
        return self._transport_scheme


def own_origin(scope) -> str | None:
    """``<scheme>://<host>`` of the handshake; None when its host is not allowed."""
    request = Handshake(scope)
    try:
        return f"{request.scheme}://{request.get_host()}"
    except (DisallowedHost, KeyError):
        return None


def trusted(origin: str) -> bool:
    """One of ``CSRF_TRUSTED_ORIGINS``, exactly or by a ``*.`` subdomain wildcard."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    for allowed in settings.CSRF_TRUSTED_ORIGINS:
        if "*" not in allowed:
            if origin == allowed:
                return True
            continue
        allowed_parts = urlsplit(allowed)
        if allowed_parts.scheme == parts.scheme and is_same_domain(
                parts.netloc, allowed_parts.netloc.replace("*", "", 1)):
            return True
    return False


def origin_allowed(scope) -> bool:
    origins = [value for name, value in scope.get("headers", ()) if name == b"origin"]
    if not origins:
        return True
    if len(origins) > 1:
        return False
    origin = origins[0].decode("latin-1")
    return origin == own_origin(scope) or trusted(origin)


class BrowserOriginValidator:
    """Refuses a websocket handshake whose ``Origin`` is not allowed (see the module)."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
