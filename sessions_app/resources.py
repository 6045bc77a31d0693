"""The one place that decides whose data a call may touch (contract §6).

Every transport (REST, SSE, websocket) calls :func:`resolve_resource` with the
caller (a Django user, possibly anonymous) and the ``resourceId`` the client
sent, and gets back the resource to scope the call to.
"""

import asyncio
import re
from importlib import import_module

from django.conf import settings
from ninja.utils import check_csrf

from . import tokens
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


# The project's permission for cross-resource access (contract §6): grant it
# to a user or a group in the admin; superusers have every permission. The
# staff flag alone (the admin's door) does not open other resources.
ALL_RESOURCES_PERM = "sessions_app.access_all_resources"


async def load_rights(user):
    """Look the caller's cross-resource right up once (async code may not
    query the database from :func:`resolve_resource`): kept on the user
    object, which every transport loads afresh (an HTTP request, a websocket
    at its handshake and at each re-check). Returns ``user``."""
    if auth_required() and user is not None and getattr(user, "is_authenticated", False):
        user.omni_all_resources = await user.ahas_perm(ALL_RESOURCES_PERM)
    return user


def may_access_all_resources(user) -> bool:
    """Whether ``user`` may name any resource: the right :func:`load_rights`
    loaded; else asked now in sync code, and in async code only what needs
    no query (an active superuser)."""
    loaded = getattr(user, "omni_all_resources", None)
    if loaded is not None:
        return loaded
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return user.has_perm(ALL_RESOURCES_PERM)
    return bool(user.is_active and user.is_superuser)


def resolve_resource(user, requested: str | None) -> str:
    """The resource a caller acts on.

    ``OMNI_AUTH=off``: the client's ``resourceId``, which is then required.
    ``OMNI_AUTH=required``: the caller must be authenticated; its resource is
    its username, and naming another resource needs the permission
    ``sessions_app.access_all_resources`` (superusers have it).
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
    if may_access_all_resources(user):
        return requested
    raise Forbidden("this resource belongs to another caller")


SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


def csrf_failed(request):
    """Django's CSRF check of a session's unsafe call (ninja's ``check_csrf``:
    a response when it fails), taking the token from ``X-CSRFToken`` only
    for a multipart body: the check reads ``request.POST`` for a form token,
    which would parse an upload (``POST /api/attachments``) whole, with
    Django's default handlers and no size limit, before the view could
    stream it (which would then find the body already read)."""
    from django.http import QueryDict
    from django.utils.datastructures import MultiValueDict

    content_type = request.META.get("CONTENT_TYPE", "").lower()
    if content_type.startswith("multipart/") and not hasattr(request, "_post"):
        request._post, request._files = QueryDict(), MultiValueDict()
    return check_csrf(request)


async def request_user(request):
    """The caller of an HTTP request: the user the API's auth classes
    (``omni.auth.API_AUTH``: Bearer token, or the session cookie with its
    CSRF check) put in ``request.auth``; anonymous with ``OMNI_AUTH=off``
    and no credentials. Outside the API's auth, the session's user, which
    must then pass Django's CSRF check on unsafe methods."""
    auth = getattr(request, "auth", None)
    if auth is not None:
        if getattr(auth, "is_authenticated", False):
            return await load_rights(auth)
        from django.contrib.auth.models import AnonymousUser

        return AnonymousUser()
    user = await request.auser()
    if (
        auth_required()
        and user.is_authenticated
        and request.method not in SAFE_METHODS
        and csrf_failed(request)
    ):
        raise Forbidden("CSRF check failed: send the X-CSRFToken header", code="csrf_failed")
    return await load_rights(user)


# --- websockets: a socket's caller, checked again while it stays open ------------

# Where omni.auth.TokenAuthMiddleware keeps the token a websocket authenticated with.
SCOPE_TOKEN = "omni.token"


async def reauthenticate(scope):
    """The caller of an open websocket, as of now (``OMNI_AUTH=required``).

    A socket authenticated by a token: that token again (revoked, expired or
    its user inactive: None). By a session: that session again (logged out,
    expired, its user inactive or its password changed: None). None too when
    the credentials now name another user. Else the user, fresh from the
    database, with its cross-resource right loaded. With ``OMNI_AUTH=off``
    the scope's user, unchecked."""
    user = scope.get("user")
    if not auth_required():
        return user
    if user is None or not user.is_authenticated:
        return None
    if (raw := scope.get(SCOPE_TOKEN)) is not None:
        fresh = await tokens.aauthenticate(raw)
    else:
        fresh = await _session_user(scope.get("session"))
    if fresh is None or not fresh.is_authenticated or fresh.pk != user.pk:
        return None
    return await load_rights(fresh)


async def _session_user(session):
    key = getattr(session, "session_key", None)
    if not key:
        return None
    from channels.auth import get_user

    store = import_module(settings.SESSION_ENGINE).SessionStore(key)  # read again, not the cached copy
    return await get_user({"session": store})
