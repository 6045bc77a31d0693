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
from tests.helpers import events_of, turn_bodies, wait_for_async

pytestmark = [pytest.mark.django_db(transaction=True)]

body = turn_bodies("ada", "att-1")


def png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (incompressible: about 3 x side² bytes)."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
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
    # (the CLI keeps a copy of the image in its temp dir: it goes with the local transcript)
    assert [p for d in services.cli_scratch_dirs(session_id) for p in d.rglob("*.png")]
    pool.forget(("ada", "att-1"), "test")
    assert await gone(pid)
    await wait_for_async(lambda: not services.local_transcript_files(session_id)
                         and not services.cli_scratch_dirs(session_id))
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


def sse_texts(raw: bytes) -> tuple[str, list[dict]]:
    import json

    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]
    return "".join(e["text"] for e in events if e["type"] == "text"), events


@pytest.mark.sdk
async def test_sse_and_websocket_messages_with_attachments_and_every_refusal(offline_chat):
    """SSE and websocket turns with attachments (text beside them, or none);
    blank text alone, more than 20, a malformed id: 400; an unknown or
    another resource's upload: 404 with nothing started or left; over the
    message's total: 413. The refusals come before any CLI starts."""
    from channels.testing import WebsocketCommunicator
    from django.test import AsyncClient

    from omni.asgi import application
    from sessions_app import selectors

    # an image the CLI re-encodes (a JPEG for the model and its transcript)
    big = await upload("bea", "noise.png", noise_png(640))
    # over 1 MB: the transcript line holding it is longer than the SDK's default buffer
    long = await upload("bea", "long.txt", b"Long text file. " + b"word " * 240_000)
    image = await upload("bea", "wide.png", png(40, 20))
    theirs = await upload("cyd", "theirs.png", png(8, 8))
    client = AsyncClient()

    async def post(path, **fields):
        return await client.post(path, {"resourceId": "bea", **fields}, content_type="application/json")

    response = await post("/api/chat", message="Describe them", threadId="sse-att",
                          attachments=[image.attachment_id, big.attachment_id, long.attachment_id])
    assert response.status_code == 200
    said, events = sse_texts(b"".join([c async for c in response.streaming_content]))
    assert events[-1]["type"] == "done", events[-1]
    # (the CLI re-encodes an image this big as a JPEG for the model: its size stays)
    assert said.split("\n")[0] == "Offline model saw image/png 40x20"
    assert said.split("\n")[1] in ("Offline model saw image/png 640x640", "Offline model saw image/jpeg 640x640")
    assert said.split("\n")[2:] == [
        'Offline model saw text document "long.txt": Long text file. word word word word word…',
        'Offline model heard: "Describe them". Earlier questions: none.']
    listed = await client.get("/api/sessions/messages", {"threadId": "sse-att", "resourceId": "bea"})
    assert listed.json()["messages"][0]["text"] == "Describe them"
    assert [a["attachmentId"] for a in listed.json()["messages"][0]["attachments"]] == [
        image.attachment_id, big.attachment_id, long.attachment_id]

    comm = WebsocketCommunicator(application, "/ws/chat/")
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "message", "message": " ", "threadId": "ws-att", "resourceId": "bea",
                             "attachments": [image.attachment_id], "chunks": False})
    events = []
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(await comm.receive_json_from(timeout=30))
    assert events[-1]["type"] == "done"
    assert "".join(e["text"] for e in events if e["type"] == "text").startswith(
        "Offline model saw image/png 40x20\nOffline model heard: \"\".")
    mapping = await selectors.get_metadata("ws-att", "bea")
    assert mapping.title == "wide.png"  # a message of attachments alone: their names

    async def ws_error(**frame):
        await comm.send_json_to({"type": "message", "resourceId": "bea", "threadId": "ws-no", **frame})
        event = await comm.receive_json_from(timeout=30)
        assert event["type"] == "error", event
        return event["code"]

    too_many = [image.attachment_id] * 21
    refusals = [  # (fields, status, code)
        ({"message": " \n"}, 400, "bad_request"),
        ({"message": "", "attachments": []}, 400, "bad_request"),
        ({"message": "hi", "attachments": too_many}, 400, "bad_request"),
        ({"message": "hi", "attachments": ["not an id"]}, 400, "bad_request"),
        ({"message": "hi", "attachments": ["att-nothing"]}, 404, "not_found"),
        ({"message": "", "attachments": [image.attachment_id, theirs.attachment_id]}, 404, "not_found"),
    ]
    for fields, status, code in refusals:
        refused = await post("/api/chat", threadId="sse-no", **fields)
        assert refused.status_code == status and refused.json()["error"]["code"] == code, (fields, refused.content)
        assert await ws_error(**fields) == code, fields
    forked = await post("/api/chat/fork", message="", forkFromThreadId="sse-att", threadId="fork-no",
                        attachments=[theirs.attachment_id])
    assert forked.status_code == 404
    offline_chat.OMNI_ATTACHMENTS_MESSAGE_MAX_BYTES = image.size - 1
    over = await post("/api/chat", message="", threadId="sse-no", attachments=[image.attachment_id])
    assert over.status_code == 413 and over.json()["error"]["code"] == "attachments_too_large"
    await comm.disconnect()
    for thread in ("sse-no", "ws-no", "fork-no"):
        await sync_to_async(nothing_left)("bea", thread)
    # the refused messages sent nothing: the other resource's upload is still unsent
    await sync_to_async(theirs.refresh_from_db)()
    assert theirs.sent_at is None


@pytest.mark.engine_agnostic
def test_the_offline_model_says_what_the_last_message_carried():
    """Only the last message's blocks are described; the CLI's note beside
    an image is not the person's text; a text-only reply is as before."""
    import base64

    from chat_app.offline_model import answer, reply_text

    def image(data):
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": base64.b64encode(data).decode()}}

    note = {"type": "text", "text": "[Image: source: /tmp/claude-0/x/images/1.png]"}
    older = {"role": "user", "content": [image(png(10, 20)), {"type": "text", "text": "first"}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}
    latest = {"role": "user", "content": [
        image(png(30, 12)), {"type": "document", "title": "a.pdf", "source": {
            "type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf(1)).decode()}},
        image(b"not an image"), note]}
    said = answer({"messages": [older, reply, latest]})[0]["text"]
    assert said == ("Offline model saw image/png 30x12\n"
                    "Offline model saw document application/pdf, 1 page\n"
                    "Offline model saw image image/png that it could not read (UnidentifiedImageError)\n"
                    'Offline model heard: "". Earlier questions: "first".')
    text_only = [older, reply, {"role": "user", "content": "second"}]
    assert answer({"messages": text_only})[0]["text"] == reply_text(text_only) == (
        'Offline model heard: "second". Earlier questions: "first".')
