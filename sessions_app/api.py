"""REST: ``/api/sessions`` (contract §4). Thin views over :mod:`.services`."""

from typing import Annotated

from asgiref.sync import sync_to_async
from ninja import Query, Router, Schema
from pydantic import Field, StringConstraints, WithJsonSchema

from . import selectors, services, transcripts, usage
from .attachments import services as attachment_services
from .resources import request_user, resolve_resource
from .schemas import (
    DeleteOut,
    ErrorOut,
    Id,
    MessagesOut,
    MetadataOut,
    SessionListOut,
    SessionOut,
    ThreadRef,
    UsageOut,
)

router = Router(tags=["sessions"])
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 503)}


class ListQuery(Schema):
    resourceId: Id | None = None
    limit: int = Field(selectors.DEFAULT_LIMIT, ge=1, le=selectors.MAX_LIMIT)
    cursor: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,256}$",
        description="a previous page's `nextCursor`, as it was given (opaque: any other value is 400)")


async def caller_resource(request, requested: str | None) -> str:
    return resolve_resource(await request_user(request), requested)


@router.get("/sessions", response={200: SessionListOut, **ERRORS}, summary="List a resource's sessions")
async def list_sessions(request, query: Query[ListQuery]):
    """Newest ``updatedAt`` first; pass ``nextCursor`` back as ``cursor`` for the next page."""
    resource = await caller_resource(request, query.resourceId)
    page = await selectors.list_sessions(resource, query.limit, query.cursor)
    sessions = [SessionOut.of(m) for m in page.sessions]
    return {"sessions": sessions, "count": len(sessions), "nextCursor": page.next_cursor}


@router.delete("/sessions", response={200: DeleteOut, **ERRORS}, summary="Delete a session")
async def delete_session(request, body: ThreadRef):
    """Removes the thread's mapping and erases its transcript."""
    resource = await caller_resource(request, body.resourceId)
    await services.delete_session(body.threadId, resource)
    return {"success": True, "threadId": body.threadId, "resourceId": resource}


@router.post("/sessions/metadata", response={200: MetadataOut, **ERRORS}, summary="A session's metadata")
async def session_metadata(request, body: ThreadRef):
    resource = await caller_resource(request, body.resourceId)
    return {"session": SessionOut.of(await selectors.get_metadata(body.threadId, resource))}


@router.get("/sessions/messages", response={200: MessagesOut, **ERRORS}, exclude_unset=True,
            summary="A thread's conversation")
async def session_messages(request, query: Query[ThreadRef]):
    """The user and assistant texts so far, in order, read from the transcript store
    (for a page that reloads). A message's `uuid` can be a fork's `atMessageUuid`. An
    assistant message that used tools carries its `toolCalls`, each with its decision when it
    needed one (`approval.decision` null: it still waits, answer it with `approvalId`). A user
    message sent with uploads carries its `attachments` (its `text` may then be empty); a fork
    shows its parent's."""
    resource = await caller_resource(request, query.resourceId)
    mapping = await selectors.get_metadata(query.threadId, resource)
    messages = await transcripts.session_messages(mapping.session_id)
    await services.add_approvals(mapping, messages)
    if any("attachments" in m for m in messages):
        await sync_to_async(attachment_services.name_messages_sync)(resource, messages)
    return {
        "threadId": mapping.thread_id,
        "sessionId": mapping.session_id,
        "messages": messages,
    }


# A calendar day as text (parsed, and refused with 400, by sessions_app.usage).
Day = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$"),
                WithJsonSchema({"type": "string", "format": "date"})]


class UsageQuery(Schema):
    resourceId: Id | None = None
    from_: Day | None = Field(None, alias="from",
                              description="YYYY-MM-DD (UTC), inclusive; default 29 days before to "
                                          "(400 if that is before 0001-01-01); from..to covers at most "
                                          f"{usage.MAX_RANGE_DAYS} days and from is not after to (else 400)")
    to: Day | None = Field(None, description="YYYY-MM-DD (UTC), inclusive; default today")


@router.get("/usage", response={200: UsageOut, **ERRORS}, by_alias=True,
            summary="What a resource's turns used and cost")
async def usage_view(request, query: Query[UsageQuery]):
    """Turns, tokens and cost per UTC day (the turns' own figures), the total, and the daily
    budget with today's spend and when it resets. At most 366 days."""
    resource = await caller_resource(request, query.resourceId)
    return await usage.usage(resource, query.from_, query.to)
