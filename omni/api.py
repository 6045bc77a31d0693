"""The HTTP API: one NinjaAPI (validation and the OpenAPI document at
``/api/openapi.json``, docs at ``/api/docs`` from ninja's bundled assets),
with every error in the contract's shape."""

import json
import logging

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from pydantic import TypeAdapter

from chat_app.api import router as chat_router
from chat_app.schemas import ChatEvent
from omni.auth import API_AUTH
from omni.health import router as health_router
from sessions_app.api import router as sessions_router
from sessions_app.attachments.api import router as attachments_router
from sessions_app.errors import (
    ApiError,
    BadRequest,
    NotAuthenticated,
    NotFound,
    Unavailable,
    describe_validation,
    unavailable_retry_after,
)

log = logging.getLogger("omni.api")


class StrictJSONParser(Parser):
    """Malformed JSON and non-object bodies are the caller's error (400)."""

    def parse_body(self, request):
        try:
            data = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data


def honest_schema(schema: dict, auth_off: bool) -> dict:
    """The OpenAPI document true for the running ``OMNI_AUTH`` mode.

    ``off``: no credentials, and ``resourceId`` is required wherever it
    appears (the server rejects a call without it). ``required``: the
    security schemes (Bearer token, Django session cookie) on every call, and
    ``resourceId`` optional (omitted: the caller's own resource).
    """

    def required_resource(obj):
        props = obj.get("properties", {})
        if "resourceId" in props:
            props["resourceId"] = not_null(props["resourceId"])
            obj["required"] = sorted(set(obj.get("required", [])) | {"resourceId"})

    def not_null(prop: dict) -> dict:
        variants = [v for v in prop.get("anyOf", []) if v.get("type") != "null"]
        if len(variants) == 1:
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **variants[0]}
        return prop

    if auth_off:
        schema.get("components", {}).pop("securitySchemes", None)
        for component in schema.get("components", {}).get("schemas", {}).values():
            required_resource(component)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.pop("security", None)
                for status in (401, "401"):  # ninja keys responses by int
                    operation.get("responses", {}).pop(status, None)
                for param in operation.get("parameters", []):
                    if param["name"] == "resourceId":
                        param["required"] = True
                        param["schema"] = not_null(param["schema"])
                for content in operation.get("requestBody", {}).get("content", {}).values():
                    required_resource(content.get("schema", {}))  # an inline form (the upload's)
    return schema


def add_event_schemas(schema: dict) -> None:
    """The chat stream's events (``ChatEvent``, contract §5) in the components."""
    events = TypeAdapter(ChatEvent).json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(events.pop("$defs", {}))
    components["ChatEvent"] = events


BODY_ERRORS = {
    413: "Content Too Large (a message over the limit, or a body over the server's)",
    415: "Unsupported Media Type (a body that is not application/json)",
}


def add_body_errors(schema: dict) -> None:
    """Every call with a body may answer 413 (a body over the server's limit)
    and 415 (``omni.middleware``), in the contract's error shape."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" not in operation:
                continue
            responses = operation.setdefault("responses", {})
            for status, description in BODY_ERRORS.items():
                if status not in responses and str(status) not in responses:
                    responses[status] = {
                        "description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
                    }


class OmniAPI(NinjaAPI):
    def get_openapi_schema(self, *, path_prefix=None, path_params=None):
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        add_event_schemas(schema)
        add_body_errors(schema)
        return honest_schema(schema, auth_off=settings.OMNI_AUTH == "off")


api = OmniAPI(
    auth=API_AUTH,
    title="Omni sessions",
    version="1.0.0",
    description="Claude Agent SDK sessions per (threadId, resourceId): list, delete, metadata, history and chat streams.",
    urls_namespace="api",
    parser=StrictJSONParser(),
)


def error_response(request, exc: ApiError):
    response = api.create_response(request, exc.as_dict(), status=exc.status)
    retry_after = exc.retry_after
    if retry_after is None and exc.status == 503:  # e.g. a status set after the error was made
        retry_after = unavailable_retry_after()
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


@api.exception_handler(ApiError)
def on_api_error(request, exc):
    return error_response(request, exc)


@api.exception_handler(ValidationError)
def on_validation_error(request, exc):
    return error_response(request, BadRequest(describe_validation(exc.errors)))


@api.exception_handler(AuthenticationError)
def on_auth_error(request, exc):
    return error_response(request, NotAuthenticated("authentication required"))


@api.exception_handler(Http404)
def on_404(request, exc):
    return error_response(request, NotFound(str(exc) or "not found"))


@api.exception_handler(HttpError)
def on_http_error(request, exc):
    # ninja's own errors, e.g. a body it could not parse
    error = next((cls for cls in ApiError.__subclasses__() if cls.status == exc.status_code), None)
    error = error(str(exc)) if error else ApiError(str(exc), code="http_error")
    error.status = exc.status_code
    return error_response(request, error)


@api.exception_handler(DatabaseError)
def on_database_error(request, exc):
    if isinstance(exc, (OperationalError, InterfaceError)):
        log.error("database unavailable: %s", exc)
        return error_response(request, Unavailable("the database is unreachable"))
    # Anything else the database refused (a constraint, a corrupt file, a
    # driver error): the call's transaction rolled back and the client cannot
    # fix it by changing its input, so not a 500 but a 503, without driver
    # details; the traceback goes to the log.
    log.error("database error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(
        request, Unavailable("the database could not complete the call", code="database_error")
    )


api.add_router("/", sessions_router)
api.add_router("/", chat_router)
api.add_router("/", attachments_router)
api.add_router("/", health_router)
