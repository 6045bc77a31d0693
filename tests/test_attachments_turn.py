"""Attachments through the chat turn (contract §11): the request, the one
user message of content blocks the CLI keeps in its transcript, what the
offline model received, the listing and the tools."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
from asgiref.sync import sync_to_async

from chat_app import sdk
from chat_app.turns import registry, start_turn
from sessions_app.attachments import inspect as inspection
from sessions_app.attachments import services as attachments
from tests.helpers import events_of, turn_bodies

pytestmark = [pytest.mark.django_db(transaction=True)]

body = turn_bodies("ada", "att-1")


def png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def pdf(pages: int) -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def upload_sync(resource: str, name: str, data: bytes):
    """An upload as POST /api/attachments keeps it (inspected, stored)."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        found = inspection.inspect(f.name, len(data), name)
        try:
            return attachments.store_sync(resource, found, name)
        finally:
            found.cleanup()
    finally:
        os.unlink(f.name)


upload = sync_to_async(upload_sync)


def text_of(events) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text")


def sent_bodies(before: int) -> list[dict]:
    """The model requests (streamed: the conversation, not the side requests) since ``before``."""
    return [r for r in sdk._offline_model.requests[before:] if r.get("stream")]


def sent_count() -> int:
    model = sdk._offline_model
    return len(model.requests) if model is not None else 0


def attachment_blocks(message: dict) -> list[dict]:
    content = message.get("content")
    return [b for b in content if isinstance(b, dict) and b.get("type") in ("image", "document")] \
        if isinstance(content, list) else []


def carried(body: dict) -> list[dict]:
    """Every image and document block of the person's messages in one model request."""
    return [b for m in body["messages"] if m.get("role") == "user" for b in attachment_blocks(m)]


def last_request(before: int) -> dict:
    bodies = sent_bodies(before)
    assert bodies, "no model request"
    return bodies[-1]


async def gone(pid, timeout=10.0) -> bool:
    import asyncio

    for _ in range(int(timeout * 20)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


def nothing_left(resource: str, thread: str) -> None:
    from chat_app.models import ThreadLease
    from sessions_app.models import AttachmentUse, SessionMapping

    assert not SessionMapping.objects.filter(resource_id=resource, thread_id=thread).exists()
    assert not ThreadLease.objects.filter(thread_id=thread).exists()
    assert not AttachmentUse.objects.filter(thread_id=thread).exists()
    assert registry.get(resource, thread) is None


@pytest.mark.sdk
async def test_a_message_of_attachments_alone_is_carried_by_later_turns_cold_resumes_and_forks(
        offline_chat):
    """One thread, reused: the first message is three attachments and no
    text; the model is told what each holds; the CLI keeps the blocks in
    its transcript (the store), so a warm follow-up, a cold resume and
    forks (whole, and cut at a reply) each send the model the image again;
    the listing names the attachments (on the fork too), never their bytes;
    read_conversation names them; search_conversations never matches base64."""
    import base64
    import json

    from django.test import AsyncClient

    from chat_app.pool import pool
    from chat_app.tools import Caller, get
    from sessions_app import selectors, services
    from sessions_app.models import Attachment, AttachmentUse

    image_bytes = png(64, 48)
    image = await upload("ada", "red.png", image_bytes)
    notes = await upload("ada", "notes.md", b"Zanzibar trip budget: flights 900, hotel 1200, food 300, "
                                             b"diving 250.\n")
    paper = await upload("ada", "three.pdf", pdf(3))
    ids = [image.attachment_id, notes.attachment_id, paper.attachment_id]
    b64 = base64.b64encode(await sync_to_async(attachments.read_bytes)(image)).decode()

    before = sent_count()
    first = await events_of(await start_turn(None, body("", attachments=ids)))
    assert first[-1]["type"] == "done" and first[-1]["result"]["isError"] is False
    assert text_of(first) == (
        "Offline model saw image/png 64x48\n"
        'Offline model saw text document "notes.md": Zanzibar trip budget: flights 900, hotel 1200, food…\n'
        "Offline model saw document application/pdf, 3 pages\n"
        'Offline model heard: "". Earlier questions: none.')
    sent = last_request(before)
    person = [m for m in sent["messages"] if m.get("role") == "user"]
    assert len(person) == 1, "one user message carries the blocks"
    assert [b["type"] for b in attachment_blocks(person[0])] == ["image", "document", "document"]
    assert carried(sent)[0]["source"]["data"] == b64
    mapping = await selectors.get_metadata("att-1", "ada")
    assert mapping.title == "red.png, notes.md, three.pdf" and mapping.message_count == 2
    uses = {u async for u in AttachmentUse.objects.filter(thread_id="att-1").values_list(
        "attachment__attachment_id", flat=True)}
    assert uses == set(ids)
    assert await Attachment.objects.filter(attachment_id__in=ids, sent_at__isnull=True).acount() == 0

    # a warm follow-up: the model gets the image again (from the CLI's context)
    before = sent_count()
    second = await events_of(await start_turn(None, body("Which colour was it?")))
    assert text_of(second) == 'Offline model heard: "Which colour was it?". Earlier questions: none.'
    assert [b["source"]["data"] for b in carried(last_request(before))][:1] == [b64]

    # a cold resume: the warm client closed, its local copy gone: from the store
    session_id = second[0]["sessionId"]
    pid = pool.idle[("ada", "att-1")].known_pid
    pool.forget(("ada", "att-1"), "test")
    assert await gone(pid)
    assert not await sync_to_async(services.local_transcript_files)(session_id)
    before = sent_count()
    third = await events_of(await start_turn(None, body("And the size?")))
    assert third[0]["resumed"] is True and third[-1]["type"] == "done"
    assert [b["source"]["data"] for b in carried(last_request(before))][:1] == [b64]

    # the listing: the first message's attachments, by id; no bytes anywhere
    client = AsyncClient()
    listed = await client.get("/api/sessions/messages", {"threadId": "att-1", "resourceId": "ada"})
    assert listed.status_code == 200
    # (the text file's words beyond the offline model's quote of its first ones)
    assert b64[:200] not in listed.content.decode() and "diving" not in listed.content.decode()
    messages = listed.json()["messages"]
    assert messages[0]["role"] == "user" and messages[0]["text"] == ""
    assert messages[0]["attachments"] == [
        {"attachmentId": a.attachment_id, "name": a.name, "mediaType": a.media_type, "size": a.size}
        for a in (image, notes, paper)]
    assert all("attachments" not in m for m in messages[1:])
    reply_uuid = messages[1]["uuid"]

    # forks, whole and cut at the first reply: the image goes along
    for thread, at in (("att-fork", None), ("att-cut", reply_uuid)):
        before = sent_count()
        fork = await events_of(await start_turn(None, body(
            "Forked: what did I send?", thread=thread, forkFromThreadId="att-1", atMessageUuid=at),
            fork=True))
        assert fork[-1]["type"] == "done", fork[-1]
        assert [b["source"]["data"] for b in carried(last_request(before))][:1] == [b64]
        assert text_of(fork).startswith('Offline model heard: "Forked: what did I send?".')
        forked = {u async for u in AttachmentUse.objects.filter(thread_id=thread).values_list(
            "attachment__attachment_id", flat=True)}
        assert forked == set(ids)
    listed = await client.get("/api/sessions/messages", {"threadId": "att-cut", "resourceId": "ada"})
    cut = listed.json()["messages"]
    assert [m["role"] for m in cut] == ["user", "assistant", "user", "assistant"]
    assert [a["attachmentId"] for a in cut[0]["attachments"]] == ids

    # the tools: read_conversation names the attachments; search never matches base64
    caller = Caller("ada", "att-other", "t-1")
    told = json.loads(await get("read_conversation").handler({"threadId": "att-1"}, caller))
    assert told["messages"][0] == {"role": "user", "text": "", "attachments": [
        {"name": "red.png", "mediaType": "image/png"}, {"name": "notes.md", "mediaType": "text/markdown"},
        {"name": "three.pdf", "mediaType": "application/pdf"}]}
    assert b64[:40] not in json.dumps(told)
    probe = b64[len(b64) // 2:len(b64) // 2 + 24]
    found = json.loads(await get("search_conversations").handler({"query": probe}, caller))
    assert found == {"matches": []}
