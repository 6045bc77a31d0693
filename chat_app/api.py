"""SSE: ``POST /api/chat`` and ``POST /api/chat/fork`` (contract §5)."""

import json

from django.http import StreamingHttpResponse
from ninja import Router

from sessions_app.resources import request_user
from sessions_app.schemas import ErrorOut

from .schemas import ChatIn, ForkIn
from .turns import Turn, start_turn

router = Router(tags=["chat"])
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 429, 503)}
SSE_DOC = {
    "responses": {
        200: {
            "description": "`text/event-stream`: `data: <event JSON>` per event, each a "
            "`ChatEvent` (components): session, text and chunk events, then done or error.",
            "content": {
                "text/event-stream": {
                    # one SSE event: its data is a ChatEvent as JSON
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/ChatEvent"},
                            },
                            "id": {"type": "string"},
                            "event": {"type": "string"},
                        },
                    },
                }
            },
        }
    }
}


def sse_response(turn: Turn) -> StreamingHttpResponse:
    async def stream():
        async for event in turn.listen():
            yield f"data: {json.dumps(event)}\n\n"

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@router.post("/chat", response=ERRORS, openapi_extra=SSE_DOC, summary="Send a message (SSE)")
async def chat(request, body: ChatIn):
    """Runs one turn on the thread, resuming its session; a missing `threadId` gets a generated one."""
    return sse_response(await start_turn(await request_user(request), body))


@router.post("/chat/fork", response=ERRORS, openapi_extra=SSE_DOC, summary="Fork a thread (SSE)")
async def fork(request, body: ForkIn):
    """Starts `threadId` as a branch of `forkFromThreadId` (optionally at `atMessageUuid`)."""
    return sse_response(await start_turn(await request_user(request), body, fork=True))
