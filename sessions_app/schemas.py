"""Request and response shapes of the REST API (contract §4), camelCase on the wire."""

from typing import Annotated

from ninja import Schema
from pydantic import Field, StringConstraints

from .models import ID_PATTERN, SessionMapping

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN, strict=True)]


def iso_z(value) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ErrorBody(Schema):
    code: str
    message: str


class ErrorOut(Schema):
    error: ErrorBody


class SessionOut(Schema):
    threadId: str
    resourceId: str
    sessionId: str
    createdAt: str = Field(examples=["2025-10-31T12:00:00.000Z"])
    updatedAt: str = Field(examples=["2025-10-31T12:05:00.000Z"])
    agent: str
    title: str
    lastMessage: str
    messageCount: int
    forkedFromThreadId: str | None
    costUsd: float = Field(0, description="the thread's model spend so far, USD")
    pendingApprovalId: str | None = Field(
        None, description="a tool call of the thread waits for a decision (busy meanwhile)")

    @staticmethod
    def of(mapping: SessionMapping) -> dict:
        return {
            "threadId": mapping.thread_id,
            "resourceId": mapping.resource_id,
            "sessionId": mapping.session_id,
            "createdAt": iso_z(mapping.created_at),
            "updatedAt": iso_z(mapping.updated_at),
            "agent": mapping.agent,
            "title": mapping.title,
            "lastMessage": mapping.last_message,
            "messageCount": mapping.message_count,
            "forkedFromThreadId": mapping.forked_from_thread_id,
            "costUsd": float(round(mapping.cost_usd or 0, 8)),
            "pendingApprovalId": mapping.pending_approval_id,
        }


class SessionListOut(Schema):
    sessions: list[SessionOut]
    count: int
    nextCursor: str | None


class ThreadRef(Schema):
    threadId: Id
    resourceId: Id | None = None


class DeleteOut(Schema):
    success: bool
    threadId: str
    resourceId: str


class MetadataOut(Schema):
    session: SessionOut


class ApprovalOut(Schema):
    decision: str | None = Field(description="allow, deny or expired; null while the call waits")
    by: str | None
    approvalId: str | None = None
    expiresAt: str | None = None


class ToolCallOut(Schema):
    toolUseId: str
    tool: str
    input: dict
    result: str | None
    isError: bool
    approval: ApprovalOut | None


class AttachmentRefOut(Schema):
    attachmentId: str | None = Field(description="the upload (`GET /api/attachments/<id>`); null "
                                                 "once it was deleted", examples=["att-9f1c2d7e4b6a4e0f8a3b5c7d9e1f2a3b"])
    name: str = Field(examples=["photo.png"])
    mediaType: str = Field(examples=["image/png"])
    size: int = Field(description="bytes")


class MessageOut(Schema):
    role: str = Field(examples=["user"])
    text: str = Field(description="what the person typed or the assistant said (never an attachment's bytes)")
    uuid: str
    toolCalls: list[ToolCallOut] | None = None
    attachments: list[AttachmentRefOut] | None = Field(
        None, description="a user message's images and documents (contract §11)")


class MessagesOut(Schema):
    threadId: str
    sessionId: str
    messages: list[MessageOut]


class UsageTotals(Schema):
    turns: int
    inputTokens: int
    outputTokens: int
    costUsd: float


class UsageDay(UsageTotals):
    date: str = Field(examples=["2026-12-03"])


class BudgetOut(Schema):
    dailyUsd: float | None = Field(description="null: no cap")
    spentTodayUsd: float
    resetsAt: str = Field(description="the next UTC midnight, ISO 8601")


class UsageOut(Schema):
    resourceId: str
    from_: str = Field(alias="from")
    to: str
    total: UsageTotals
    days: list[UsageDay]
    budget: BudgetOut
