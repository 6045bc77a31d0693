"""Every ``/api/`` answer in the contract's error shape, even those Django or
ninja produce before a view runs (unknown path, method not allowed, CSRF);
and ``/api/`` bodies that are JSON or nothing (415)."""


from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import JsonResponse

CODES = {404: "not_found", 405: "method_not_allowed", 403: "forbidden", 400: "bad_request"}


def as_api_error(request, response):
    if (
        request.path.startswith("/api/")
        and response.status_code >= 400
        and not response.get("Content-Type", "").startswith("application/json")
        and not getattr(response, "streaming", False)
    ):
        message = response.reason_phrase
        if response.status_code == 405 and response.get("Allow"):
            message = f"{message}; allowed: {response['Allow']}"
        api_response = JsonResponse(
            {"error": {"code": CODES.get(response.status_code, "error"), "message": message}},
            status=response.status_code,
        )
        if response.get("Allow"):
            api_response["Allow"] = response["Allow"]
        return api_response
    return response


class _SyncAndAsync:
    """A middleware for both sync and async stacks (Django's pattern);
    subclasses say what they do in :meth:`before` and :meth:`after`."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def before(self, request):
        """A response that answers the request instead of the view, or None."""
        return None

    def after(self, request, response):
        return response

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self.before(request) or self.after(request, self.get_response(request))

    async def __acall__(self, request):
        return self.before(request) or self.after(request, await self.get_response(request))


class ApiErrorMiddleware(_SyncAndAsync):
    def after(self, request, response):
        return as_api_error(request, response)


# --- 415: an /api/ body must be JSON (contract §4) ---------------------------------

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
UPLOAD_PATH = "/api/attachments"


def has_body(request) -> bool:
    meta = request.META
    if meta.get("CONTENT_TYPE") or "HTTP_TRANSFER_ENCODING" in meta:
        return True
    try:
        return int(meta.get("CONTENT_LENGTH") or 0) != 0
    except ValueError:
        return True


def unsupported_media_type(request):
    """A 415 for an ``/api/`` POST, PUT, PATCH or DELETE whose body is not
    ``application/json`` (a form, ``text/plain``, no type at all), in both
    auth modes: a cross-site form or a ``no-cors`` fetch, which a browser
    sends without asking the server first, cannot send
    ``application/json``, so with ``OMNI_AUTH=off`` no other page can start
    turns on a developer's machine. No body at all is left to the view
    (400 when it needs one). None when the request may go on."""
    if (
        request.method not in BODY_METHODS
        or not request.path.startswith("/api/")
        or request.content_type.lower() == "application/json"
        or not has_body(request)
        # multipart (contract §11); another method there is the router's 405
        or request.path == UPLOAD_PATH
    ):
        return None
    sent = request.content_type or "none"
    return JsonResponse(
        {"error": {"code": "unsupported_media_type",
                   "message": f"the body must be JSON (Content-Type: application/json), not {sent[:100]}"}},
        status=415,
    )


class JsonBodyMiddleware(_SyncAndAsync):
    def before(self, request):
        return unsupported_media_type(request)
