"""Chat requests (contract §5), validated the same way for SSE and websockets."""

from typing import Annotated, Literal

from ninja import Schema
from pydantic import Field, StrictInt, StrictStr, ValidationError

from sessions_app.errors import BadRequest, describe_validation
from sessions_app.schemas import Id


class ChatIn(Schema):
    message: StrictStr
    threadId: Id | None = None
    resourceId: Id | None = None
    agent: StrictStr | None = Field(None, examples=["smart"])


class ForkIn(Schema):
    message: StrictStr
    forkFromThreadId: Id
    threadId: Id
    resourceId: Id | None = None
    agent: StrictStr | None = Field(None, examples=["smart"])
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


class FollowFrame(Schema):
    type: Literal["follow"]
    threadId: Id
    resourceId: Id | None = None
    # Only the events after this seq (a client that saw up to it); default: all.
    afterSeq: Annotated[StrictInt, Field(ge=0)] | None = None


FRAMES = {
    "message": MessageFrame,
    "fork": ForkFrame,
    "interrupt": InterruptFrame,
    "follow": FollowFrame,
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
