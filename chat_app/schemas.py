"""Chat requests (contract §5), validated the same way for SSE and websockets."""

import re
from typing import Annotated, Literal

from django.conf import settings
from ninja import Schema
from pydantic import (
    Field, StrictBool, StrictInt, StrictStr, StringConstraints, ValidationError, WithJsonSchema,
    model_validator,
)

from sessions_app.errors import BadRequest, describe_validation
from sessions_app.schemas import Id


# Blank: only the characters JSON Schema's (ECMAScript's) \s matches, so the
# documented pattern and this check agree on every message (Python's \s
# also counts the ASCII separators \x1c-\x1f, which ECMAScript's does not).
ECMA_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = re.compile(f"[^{ECMA_SPACE}]")


def not_blank(text: str) -> str:
    if not NOT_BLANK.search(text):
        raise ValueError("must not be empty or only whitespace")
    return text


# A user's message: text with at least one non-space character (400
# otherwise), unless the message carries attachments (then it may be empty:
# checked by the request's model, see _Turn). Its length limit is checked by
# the turn pipeline (413): the document says so in words, not as a
# maxLength (a fuzzer negating a maxLength of 100,000 asks Hypothesis for a
# longer string than it can make).
Message = Annotated[
    StrictStr,
    Field(
        description=f"the text, at most {settings.OMNI_MAX_MESSAGE_CHARS:,} characters (413 beyond); it "
                    "must hold a non-space character unless `attachments` is given",
        examples=["What is 2+2?"],
    ),
]
# Uploads of the same resource (contract §11) sent with the message, in order.
Attachments = Annotated[
    list[Id],
    Field(max_length=settings.OMNI_ATTACHMENTS_PER_MESSAGE,
          description=f"ids of the resource's uploads (`POST /api/attachments`), at most "
                      f"{settings.OMNI_ATTACHMENTS_PER_MESSAGE}; an unknown or foreign one is 404",
          examples=[["att-9f1c2d7e4b6a4e0f8a3b5c7d9e1f2a3b"]]),
]
# An agent preset's name (an unknown one is 400 unknown_agent).
Agent = Annotated[
    Annotated[StrictStr, WithJsonSchema({"type": "string", "enum": sorted(settings.OMNI_AGENTS)})] | None,
    Field(examples=["smart"]),
]


Chunks = Annotated[StrictBool, Field(description="false: leave out this turn's chunk events (the raw SDK "
                                                 "messages); the other events are unchanged")]


# In the document: a message's text holds a non-space character, or the
# message carries attachments (JSON Schema's pattern is ECMAScript's: see ECMA_SPACE).
SAYS_SOMETHING = {"anyOf": [
    {"properties": {"message": {"pattern": NOT_BLANK.pattern}}},
    {"required": ["attachments"], "properties": {"attachments": {"minItems": 1}}},
]}


# What to do when the thread already runs a turn (contract §12).
IfBusy = Annotated[
    Literal["reject", "enqueue", "interrupt"],
    Field(description="when the thread already runs a turn: `reject` (409 `thread_busy`), `enqueue` "
                      "(the message waits in the thread's queue and runs next: the stream opens with "
                      "`queued`; 429 `queue_full` over `OMNI_MAX_QUEUED_PER_THREAD`) or `interrupt` "
                      "(the running turn is stopped and this message runs as soon as it ended)"),
]


class _Turn(Schema):
    """What every request that sends a message has: the text and its attachments."""

    model_config = {"json_schema_extra": SAYS_SOMETHING}

    message: Message
    attachments: Attachments = []
    ifBusy: IfBusy = "reject"

    @model_validator(mode="after")
    def _says_something(self):
        if not self.attachments:
            try:
                not_blank(self.message)
            except ValueError as exc:
                raise ValueError(f"message {exc}") from None
        return self


class ChatIn(_Turn):
    threadId: Id | None = None
    resourceId: Id | None = None
    agent: Agent = None
    chunks: Chunks = True


class ForkIn(_Turn):
    forkFromThreadId: Id
    threadId: Id
    resourceId: Id | None = None
    agent: Agent = None
    chunks: Chunks = True
    atMessageUuid: Annotated[str, Field(min_length=1, max_length=128)] | None = None


# Websocket frames: the same bodies with a "type".
class MessageFrame(ChatIn):
    type: Literal["message"]


class ForkFrame(ForkIn):
    type: Literal["fork"]


class InterruptFrame(Schema):
    type: Literal["interrupt"]
    threadId: Id
    resourceId: Id | None = None


TurnId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,64}$")]
QueueId = Annotated[str, StringConstraints(pattern=r"^q-[0-9a-f]{32}$"),
                    Field(examples=["q-9f1c2d7e4b6a4e0f8a3b5c7d9e1f2a3b"])]


class QueueQuery(Schema):
    threadId: Id
    resourceId: Id | None = None


class QueuedOut(Schema):
    queueId: str
    message: str
    position: int = Field(description="1: the next to run")
    createdAt: str


class QueueOut(Schema):
    queued: list[QueuedOut]


class CancelIn(Schema):
    threadId: Id
    resourceId: Id | None = None
    queueId: QueueId


class CancelOut(Schema):
    success: bool
    queueId: str


class CancelFrame(CancelIn):
    type: Literal["cancel"]


class FollowFrame(Schema):
    type: Literal["follow"]
    threadId: Id
    resourceId: Id | None = None
    # That turn only (a client reconnecting to the turn it was reading), even
    # if it ended moments ago; default: the thread's running turn.
    turnId: TurnId | None = None
    # Only the events after this seq of turnId (a client that saw up to it); default: all.
    afterSeq: Annotated[StrictInt, Field(ge=0, le=2**31)] | None = None

    @model_validator(mode="after")
    def _cursor_names_its_turn(self):
        if self.afterSeq is not None and self.turnId is None:
            raise ValueError("afterSeq counts in a turn: send the turnId it belongs to")
        return self


ApprovalId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,64}$")]


class ApprovalIn(Schema):
    """A person's decision on a tool call that waits (contract §9)."""

    threadId: Id
    resourceId: Id | None = None
    approvalId: ApprovalId
    decision: Literal["allow", "deny"]
    message: Annotated[StrictStr, Field(max_length=2000)] | None = Field(
        None, description="a note for the agent (with deny: why)")


class ApprovalOut(Schema):
    approvalId: str
    decision: Literal["allow", "deny"]


class ApprovalFrame(ApprovalIn):
    type: Literal["approval"]


FRAMES = {
    "message": MessageFrame,
    "fork": ForkFrame,
    "interrupt": InterruptFrame,
    "follow": FollowFrame,
    "approval": ApprovalFrame,
    "cancel": CancelFrame,
}


def parse_frame(data) -> Schema:
    """A websocket frame (already JSON-decoded) to its schema, or BadRequest."""
    if not isinstance(data, dict):
        raise BadRequest("a frame must be a JSON object")
    schema = FRAMES.get(data.get("type"))
    if schema is None:
        raise BadRequest(f"unknown frame type {data.get('type')!r}; expected one of {sorted(FRAMES)}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_validation(exc.errors())) from exc


# --- the stream's events (contract §5), for the OpenAPI document -------------------


class _Event(Schema):
    seq: int = Field(description="the event's 0-based position in its turn")
    turnId: str = Field(description="the turn the event belongs to")
    threadId: str = Field(description="the thread of that turn")


class SessionEvent(_Event):
    type: Literal["session"]
    threadId: str
    resourceId: str
    sessionId: str
    resumed: bool
    forkedFromThreadId: str | None
    notice: str | None = Field(None, description="a stored session could not be resumed")


class QueuedEvent(_Event):
    type: Literal["queued"]
    queueId: str
    position: int = Field(description="its place in the thread's queue when it was queued (1: next)")


class TextEvent(_Event):
    type: Literal["text"]
    sessionId: str
    text: str


class ChunkEvent(_Event):
    type: Literal["chunk"]
    sessionId: str
    chunk: dict = Field(description='an SDK message: {"kind": "<SDK message class>", ...its fields}')


class ToolUseEvent(_Event):
    type: Literal["tool_use"]
    toolUseId: str
    tool: str = Field(examples=["mcp__omni__search_conversations"])
    input: dict


class ApprovalRequestEvent(_Event):
    type: Literal["approval_request"]
    approvalId: str
    toolUseId: str
    tool: str
    input: dict
    expiresAt: str = Field(description="ISO 8601: then the call is denied (expired)")


class ApprovalEvent(_Event):
    type: Literal["approval"]
    approvalId: str
    decision: Literal["allow", "deny", "expired"]
    by: str


class ToolResultEvent(_Event):
    type: Literal["tool_result"]
    toolUseId: str
    isError: bool
    text: str


class DoneResult(Schema):
    durationMs: int | None
    costUsd: float | None
    numTurns: int | None
    isError: bool
    usage: dict | None


class DoneEvent(_Event):
    type: Literal["done"]
    sessionId: str
    result: DoneResult


class ErrorEvent(_Event):
    type: Literal["error"]
    code: str = Field(examples=["model_unavailable"])
    message: str
    retryAfter: int | None = Field(None, description="seconds, for rate_limited and server_busy")


ChatEvent = Annotated[
    QueuedEvent | SessionEvent | TextEvent | ChunkEvent | ToolUseEvent | ApprovalRequestEvent | ApprovalEvent
    | ToolResultEvent | DoneEvent | ErrorEvent,
    Field(discriminator="type"),
]
