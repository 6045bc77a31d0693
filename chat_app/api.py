"""SSE: ``POST /api/chat`` and ``POST /api/chat/fork`` (contract §5)."""

import json

from django.http import StreamingHttpResponse
from ninja import Query, Router, Schema

from sessions_app.errors import BadRequest
from sessions_app.resources import request_user, resolve_resource
from sessions_app.schemas import ErrorOut, Id

from . import streams
from .schemas import ChatIn, ForkIn
from .turns import start_turn

router = Router(tags=["chat"])
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 429, 503)}
SSE_DOC = {
    "responses": {
        200: {
            "description": "`text/event-stream`: `id: <seq>` and `data: <event JSON>` per event, "
            "each a `ChatEvent` (components): session, text and chunk events, then done or error.",
            "content": {
                "text/event-stream": {
                    # one SSE event: its data is a ChatEvent as JSON
                    "schema": {
                        "type": "object",
                        "required": ["id", "data"],
                        "properties": {
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/ChatEvent"},
                            },
                            "id": {"type": "string", "description": "the event's `seq`"},
                            "event": {"type": "string"},
                        },
                    },
                }
            },
        }
    }
}


def sse_response(events) -> StreamingHttpResponse:
    """A turn's events (an async iterator) as ``id: <seq>`` + ``data: <json>``."""

    async def stream():
        async for event in events:
            yield f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n"

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@router.post("/chat", response=ERRORS, openapi_extra=SSE_DOC, summary="Send a message (SSE)")
async def chat(request, body: ChatIn):
    """Runs one turn on the thread, resuming its session; a missing `threadId` gets a generated one."""
    return sse_response((await start_turn(await request_user(request), body)).listen())


@router.post("/chat/fork", response=ERRORS, openapi_extra=SSE_DOC, summary="Fork a thread (SSE)")
async def fork(request, body: ForkIn):
    """Starts `threadId` as a branch of `forkFromThreadId` (optionally at `atMessageUuid`)."""
    return sse_response((await start_turn(await request_user(request), body, fork=True)).listen())


class StreamQuery(Schema):
    threadId: Id
    resourceId: Id | None = None


@router.get("/chat/stream", response=ERRORS, openapi_extra={
    **SSE_DOC,
    "parameters": [{
        "in": "header", "name": "Last-Event-ID", "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "the `seq` of the last event the client has: only later events are sent",
    }],
}, summary="Follow a thread's running turn (SSE)")
async def follow(request, query: Query[StreamQuery]):
    """Every event of the thread's running turn (on any server process sharing the
    channel layer), or only those after `Last-Event-ID`, then the rest live. 404 when
    no turn runs (with `Last-Event-ID`: nor ended in the last moments)."""
    after = None
    if (last := request.headers.get("Last-Event-ID")) is not None:
        if not last.strip().isdigit():
            raise BadRequest("Last-Event-ID must be the seq (a non-negative integer) of an event")
        after = int(last)
    resource = resolve_resource(await request_user(request), query.resourceId)
    return sse_response(await streams.follow(resource, query.threadId, after))
