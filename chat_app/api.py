"""SSE: ``POST /api/chat``, ``POST /api/chat/fork`` and ``GET /api/chat/stream``
(contract §5)."""

import asyncio
import re

from django.conf import settings
from django.http import StreamingHttpResponse
from ninja import Query, Router, Schema

from sessions_app.errors import BadRequest
from sessions_app.resources import request_user, resolve_resource
from sessions_app.schemas import ErrorOut, Id

from . import approvals, queue, streams
from .schemas import ApprovalIn, ApprovalOut, CancelIn, CancelOut, ChatIn, ForkIn, QueueOut, QueueQuery
from .turns import start_turn

router = Router(tags=["chat"])
# An SSE id: the turn and the event's seq in it (ASCII only, bounded).
LAST_EVENT_ID_PATTERN = r"^[A-Za-z0-9]{1,64}:[0-9]{1,9}$"
LAST_EVENT_ID = re.compile(r"^(?P<turn>[A-Za-z0-9]{1,64}):(?P<seq>[0-9]{1,9})$", re.ASCII)
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
                            "id": {"type": "string", "description": "`<turnId>:<seq>`: the event's turn "
                                   "and position, for `Last-Event-ID`"},
                            "event": {"type": "string"},
                        },
                    },
                }
            },
        }
    }
}


HEARTBEAT = ": keep-alive\n\n"


async def with_heartbeat(stream, interval: float):
    """``stream``'s events as SSE text, with a comment line after every
    ``interval`` seconds of quiet (a proxy's idle timeout must not cut a
    quiet turn)."""
    iterator = aiter(stream.texts())
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            try:
                while True:
                    # wait without cancelling the step: the stream goes on
                    done, _ = await asyncio.wait({step}, timeout=interval)
                    if done:
                        break
                    yield HEARTBEAT
                event, text = step.result()
            except StopAsyncIteration:
                return
            finally:
                if not step.done():
                    step.cancel()
            yield f"id: {event['turnId']}:{event['seq']}\ndata: {text}\n\n"
    finally:
        if (close := getattr(iterator, "aclose", None)) is not None:
            await close()


def sse_response(events: "streams.Stream") -> StreamingHttpResponse:
    """A turn's events (an async iterator) as ``id: <turnId>:<seq>`` +
    ``data: <json>``, with heartbeats (``OMNI_SSE_HEARTBEAT_SECONDS``)."""

    def stream():
        return with_heartbeat(events, float(settings.OMNI_SSE_HEARTBEAT_SECONDS))

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@router.post("/chat", response=ERRORS, openapi_extra=SSE_DOC, summary="Send a message (SSE)")
async def chat(request, body: ChatIn):
    """Runs one turn on the thread, resuming its session; a missing `threadId` gets a generated one.
    `attachments` (uploads of the same resource, at most 20) go to the model as content blocks
    beside the text, which may then be empty: 404 for an unknown or another resource's upload,
    413 `attachments_too_large` over `OMNI_ATTACHMENTS_MESSAGE_MAX_MB` together. A busy thread:
    as `ifBusy` says (409 `thread_busy`; queued: the stream opens with `queued`, 429 `queue_full`;
    or the running turn interrupted and this message run next)."""
    return sse_response(queue.stream_of(await start_turn(await request_user(request), body)))


@router.post("/chat/fork", response=ERRORS, openapi_extra=SSE_DOC, summary="Fork a thread (SSE)")
async def fork(request, body: ForkIn):
    """Starts `threadId` as a branch of `forkFromThreadId` (optionally at `atMessageUuid`)."""
    return sse_response(queue.stream_of(await start_turn(await request_user(request), body, fork=True)))


class StreamQuery(Schema):
    threadId: Id
    resourceId: Id | None = None


@router.get("/chat/stream", response=ERRORS, openapi_extra={
    **SSE_DOC,
    "parameters": [{
        "in": "header", "name": "Last-Event-ID", "required": False,
        "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN, "minLength": 3, "maxLength": 74},
        "example": "9f1c2d7e4b6a4e0f8a3b5c7d9e1f2a3b:17",
        "description": "the SSE `id` (`<turnId>:<seq>`) of the last event the client has: only "
                       "later events of that turn are sent (its tail if it ended moments ago); "
                       "404 when that turn is gone",
    }],
}, summary="Follow a thread's running turn (SSE)")
async def follow(request, query: Query[StreamQuery]):
    """Every event of the thread's running turn (on any server process sharing the
    channel layer), then the rest live; with `Last-Event-ID`, only the later events of the
    turn it names. Without `Last-Event-ID`, a thread whose tool call waits while no turn runs
    (every server process restarted): its `approval_request` again, then the turn that goes on
    after the decision, through `done`. With the `Last-Event-ID` of a queued message's `queued`
    event while it waits: the rest of its stream. 404 when no turn runs and no call waits (with
    `Last-Event-ID`: when that turn neither runs nor ended in the last moments)."""
    turn_id = after = None
    if (last := request.headers.get("Last-Event-ID")) is not None:
        match = LAST_EVENT_ID.fullmatch(last.strip())
        if match is None:
            raise BadRequest("Last-Event-ID must be an event's SSE id: <turnId>:<seq>")
        turn_id, after = match["turn"], int(match["seq"])
    resource = resolve_resource(await request_user(request), query.resourceId)
    return sse_response(await queue.follow(resource, query.threadId, turn_id=turn_id, after=after))


@router.post("/chat/approval", response={200: ApprovalOut, **ERRORS}, summary="Decide a tool call")
async def approval(request, body: ApprovalIn):
    """Allow or deny a tool call that waits for a person (an `approval_request` event), on any
    server process: the conversation goes on, streamed to whoever follows the thread. 404 unknown
    or expired approval, 409 `already_decided`."""
    return await approvals.decide(await request_user(request), body)


@router.get("/chat/queue", response={200: QueueOut, **ERRORS}, summary="A thread's queued messages")
async def queue_list(request, query: Query[QueueQuery]):
    """The messages waiting for the thread (sent with `ifBusy: "enqueue"` or `"interrupt"` while
    it was busy), in the order they will run; `position` 1 runs next. 404 for a thread the
    resource does not have."""
    resource = resolve_resource(await request_user(request), query.resourceId)
    return await queue.listing(resource, query.threadId)


@router.delete("/chat/queue", response={200: CancelOut, **ERRORS}, summary="Cancel a queued message")
async def queue_cancel(request, body: CancelIn):
    """Cancel a message still waiting in the thread's queue: its stream ends with `error`
    `cancelled`. 404 once its turn started, or for an unknown id."""
    resource = resolve_resource(await request_user(request), body.resourceId)
    return await queue.cancel(resource, body.threadId, body.queueId)
