"""The contract's errors (§4): ``{"error": {"code", "message"}}`` with a status.

Raised by services, the REST API and the chat pipeline alike; each transport
turns them into its own shape (JSON response, SSE ``error`` event, websocket
``error`` event).
"""


class ApiError(Exception):
    status = 400
    code = "bad_request"

    retry_after: int | None = None  # seconds: a ``Retry-After`` header (409, 429, 503)

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if retry_after is None and self.status == 503:
            retry_after = unavailable_retry_after()  # every 503 says when to try again
        if retry_after is not None:
            self.retry_after = max(1, int(retry_after))

    def as_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}



class BadRequest(ApiError):
    status, code = 400, "bad_request"


class NotAuthenticated(ApiError):
    status, code = 401, "not_authenticated"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "message_too_large"


class RateLimited(ApiError):
    """A resource over its turn rate or concurrent-turn limit."""

    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    """The database or the model cannot be reached: 503 with ``Retry-After``."""

    status, code = 503, "unavailable"


class ServerBusy(Unavailable):
    """Every live Claude process of this server is busy (or it is stopping)."""

    code = "server_busy"


def unavailable_retry_after() -> int:
    """The ``Retry-After`` seconds of a 503 that names none of its own
    (``OMNI_BUSY_RETRY_AFTER``, as ``server_busy``)."""
    from django.conf import settings

    return getattr(settings, "OMNI_BUSY_RETRY_AFTER", 2)


def describe_validation(errors) -> str:
    """pydantic's error list as one readable message."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "payload"))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid input"
