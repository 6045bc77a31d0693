"""Who is calling (contract §6), for every transport.

HTTP: ninja auth classes applied to the whole API (so the OpenAPI document
names the security schemes): ``Authorization: Bearer <token>``, or the
Django session cookie (the admin's login) which must then pass Django's CSRF
check on unsafe methods. A wrong, expired or revoked token is 401 even when
a session cookie comes with it. ``OMNI_AUTH=off`` lets every call through
(the client's ``resourceId`` decides, see ``sessions_app.resources``).

Websocket: :class:`TokenAuthMiddleware`, inside Channels' session auth:
``?token=<token>`` or an ``Authorization: Bearer`` header (non-browser
clients) sets ``scope["user"]``; a wrong one refuses the handshake.
"""

from urllib.parse import parse_qs

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from ninja.security import HttpBearer
from ninja.security.apikey import APIKeyCookie

from sessions_app import tokens
from sessions_app.errors import Forbidden, NotAuthenticated
from sessions_app.resources import SCOPE_TOKEN, csrf_failed, load_rights

SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


def auth_off() -> bool:
    return settings.OMNI_AUTH == "off"


class BearerToken(HttpBearer):
    """``Authorization: Bearer <token>`` (an API token from ``issue_token``)."""

    openapi_bearerFormat = "omni token from manage.py issue_token"

    async def __call__(self, request):
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            if auth_off():
                return None
            raise NotAuthenticated("the Authorization header must be 'Bearer <token>'",
                                   code="invalid_token")
        return await self.authenticate(request, raw.strip())

    async def authenticate(self, request, token):
        user = await tokens.aauthenticate(token)
        if user is None:
            if auth_off():
                return None  # the token does not matter then
            raise NotAuthenticated("invalid, expired or revoked token", code="invalid_token")
        return user


class DjangoSession(APIKeyCookie):
    """A logged-in Django session (cookie), with Django's CSRF check on
    unsafe methods (send ``X-CSRFToken``)."""

    param_name = settings.SESSION_COOKIE_NAME

    def __init__(self):
        super().__init__(csrf=True)

    async def __call__(self, request):
        if self.param_name not in request.COOKIES:
            return None
        user = await request.auser()
        if not user.is_authenticated:
            return None
        if request.method not in SAFE_METHODS and not auth_off() and csrf_failed(request):
            raise Forbidden("CSRF check failed: send the X-CSRFToken header", code="csrf_failed")
        return user

    def authenticate(self, request, key):  # pragma: no cover - __call__ does the work
        raise NotImplementedError


class AuthOff:
    """``OMNI_AUTH=off``: every call gets through without credentials."""

    is_async = True

    async def __call__(self, request):
        return auth_off()


# The API-wide auth list: the first that returns a truthy value wins; its
# value is ``request.auth`` (a user, or True with auth off).
API_AUTH = [BearerToken(), DjangoSession(), AuthOff()]


# --- websockets ------------------------------------------------------------------


def scope_token(scope) -> str | None:
    """The token a websocket handshake carries: ``?token=`` or a Bearer header."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if values := query.get("token"):
        return values[-1]
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, raw = value.decode("latin-1").partition(" ")
            return raw.strip() if scheme.lower() == "bearer" else value.decode("latin-1")
    return None


class TokenAuthMiddleware:
    """Authenticates a websocket by its token, if it has one (else the
    session's user, set by Channels' ``AuthMiddlewareStack`` outside, stays).
    A wrong, expired or revoked token refuses the handshake. The token is
    kept in the scope (``SCOPE_TOKEN``) for the consumer to check it again
    while the socket is open (``sessions_app.resources.reauthenticate``), and
    the user's cross-resource right is loaded."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or auth_off():
            return await self.app(scope, receive, send)
        scope = dict(scope)
        if (raw := scope_token(scope)) is not None:
            user = await tokens.aauthenticate(raw)
            if user is None:
                return await WebsocketDenier()(scope, receive, send)
            scope.update(user=user, **{SCOPE_TOKEN: raw})
        await load_rights(scope.get("user"))
        return await self.app(scope, receive, send)
