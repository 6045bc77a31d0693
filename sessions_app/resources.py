"""The one place that decides whose data a call may touch (contract §6).

Every transport (REST, SSE, websocket) calls :func:`resolve_resource` with the
caller (a Django user, possibly anonymous) and the ``resourceId`` the client
sent, and gets back the resource to scope the call to.
"""

import re

from django.conf import settings
from ninja.utils import check_csrf

from .errors import BadRequest, Forbidden, NotAuthenticated
from .models import ID_PATTERN

ID_RE = re.compile(ID_PATTERN)


def validate_id(value, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if not ID_RE.fullmatch(value):
        raise BadRequest(f"{field} must match [A-Za-z0-9._:-]{{1,128}}")
    return value


def auth_required() -> bool:
    return settings.OMNI_AUTH != "off"


def resolve_resource(user, requested: str | None) -> str:
    """The resource a caller acts on.

    ``OMNI_AUTH=off``: the client's ``resourceId``, which is then required.
    ``OMNI_AUTH=required``: the caller must be authenticated; its resource is
    its username, and naming another resource needs staff rights.
    """
    if requested is not None:
        validate_id(requested, "resourceId")
    if not auth_required():
        if requested is None:
            raise BadRequest("resourceId is required")
        return requested
    if user is None or not user.is_authenticated:
        raise NotAuthenticated("authentication required")
    own = user.get_username()
    if requested is None or requested == own:
        return own
    if user.is_staff:
        return requested
    raise Forbidden("this resource belongs to another caller")


SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


async def request_user(request):
    """The caller of an HTTP request: the user the API's auth classes
    (``omni.auth.API_AUTH``: Bearer token, or the session cookie with its
    CSRF check) put in ``request.auth``; anonymous with ``OMNI_AUTH=off``
    and no credentials. Outside the API's auth, the session's user, which
    must then pass Django's CSRF check on unsafe methods."""
    auth = getattr(request, "auth", None)
    if auth is not None:
        if getattr(auth, "is_authenticated", False):
            return auth
        from django.contrib.auth.models import AnonymousUser

        return AnonymousUser()
    user = await request.auser()
    if (
        auth_required()
        and user.is_authenticated
        and request.method not in SAFE_METHODS
        and check_csrf(request)
    ):
        raise Forbidden("CSRF check failed: send the X-CSRFToken header", code="csrf_failed")
    return user
