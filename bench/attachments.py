"""A message with a 1 MB image, as a client sees it, beside the raw SDK.

One live daphne server (spares on, as by default) and one raw
``ClaudeSDKClient`` kept warm, both against the offline model in a process
of its own (``bench.pool.ModelProcess``). The image (random pixels, a PNG
of about 1 MB: the server stores it as uploaded, re-encoded without
metadata) is uploaded once (``POST /api/attachments``, not timed); each
sample then sends it again:

* raw: the warm client's next message, ``query()`` with one user message
  whose content is the image block (the stored bytes, base64) and a text
  block, by streaming input; ms to the first text delta;
* project: the same message over the websocket (``"attachments": [id]``)
  on a thread whose client is warm; ms to the first ``text`` event.

Each sample is a conversation of its own, raw then project (a shared
machine's speed drifts): its first message, a warm text follow-up, then the
warm follow-up with the image (so no earlier image rides along in the
request). The text follow-ups give the warm path's overhead without
attachments in the same run.

Target: project <= 1.1 x raw + 15 ms. Writes ``bench/results/attachments.md``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
import uuid

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

from .pool import RESULTS, ModelProcess, _first_text, _ms, machine, raw_options, start_server, wait_spare

SAMPLES = 8
IMAGE_BYTES = 1_000_000


def noise_png(target: int = IMAGE_BYTES) -> bytes:
    """A PNG of random pixels (incompressible) of about ``target`` bytes."""
    import os

    from PIL import Image

    side = int((target / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def _one(message: dict):
    yield message


async def raw_turn(client: ClaudeSDKClient, content) -> float:
    """One message to a warm client (a string, or content blocks): ms to its first text."""
    started, first = time.perf_counter(), None
    if isinstance(content, str):
        await client.query(content)
    else:
        await client.query(_one({"type": "user", "message": {"role": "user", "content": content},
                                 "parent_tool_use_id": None}))
    async for reply in client.receive_response():
        if first is None and _first_text(reply):
            first = time.perf_counter() - started
    return _ms(first)


async def ws_turn(ws, thread: str, message: str, attachments: list[str]) -> float:
    started, first = time.perf_counter(), None
    await ws.send_json({"type": "message", "message": message, "threadId": thread, "resourceId": "bench",
                        "attachments": attachments, "chunks": False})
    while True:
        event = json.loads((await ws.receive(timeout=120)).data)
        if event["type"] == "text" and first is None:
            first = _ms(time.perf_counter() - started)
        if event["type"] == "done":
            return first
        if event["type"] == "error":
            raise RuntimeError(f"turn failed: {event}")


async def measure_with(model_url: str) -> dict:
    import aiohttp

    options = raw_options(model_url)
    # the server's clients take lines this long (chat_app.sdk.max_line_bytes); so must the raw one
    options["max_buffer_size"] = 64 * 1024 * 1024
    png = noise_png()
    server = start_server("attachments", model_url, OMNI_SPARE_CLIENTS="1")
    http = aiohttp.ClientSession()
    try:
        form = aiohttp.FormData()
        form.add_field("resourceId", "bench")
        form.add_field("file", png, filename="noise.png", content_type="image/png")
        base = f"http://127.0.0.1:{server.port}"
        async with http.post(f"{base}/api/attachments", data=form) as response:
            uploaded = await response.json()
            assert response.status == 201, uploaded
        async with http.get(f"{base}/api/attachments/{uploaded['attachmentId']}",
                            params={"resourceId": "bench"}) as response:
            stored = await response.read()
            assert response.status == 200, stored[:200]
        block = {"type": "image", "source": {"type": "base64", "media_type": uploaded["mediaType"],
                                             "data": base64.b64encode(stored).decode("ascii")}}
        ws = await http.ws_connect(server.ws_url())
        out = {"raw": [], "project": [], "raw_text": [], "project_text": [], "size": len(stored)}
        for i in range(SAMPLES):
            # A conversation of its own per sample (else each image would ride
            # along in every later request): its first message, then a warm
            # text follow-up and a warm follow-up with the image.
            raw = ClaudeSDKClient(ClaudeAgentOptions(**options))
            await raw.connect()
            try:
                await raw_turn(raw, "hello")
                await asyncio.sleep(1)  # the CLI's work after a first message (its title) done
                out["raw_text"].append(await raw_turn(raw, f"text {i}"))
                out["raw"].append(await raw_turn(raw, [block, {"type": "text", "text": f"image {i}"}]))
            finally:
                await raw.disconnect()
            await wait_spare(server, i + 1)  # not beside a spare's start
            thread = f"att-{uuid.uuid4().hex[:8]}"
            await ws_turn(ws, thread, "hello", [])
            await wait_spare(server, i + 2)
            await asyncio.sleep(1)
            out["project_text"].append(await ws_turn(ws, thread, f"text {i}", []))
            out["project"].append(await ws_turn(ws, thread, f"image {i}", [uploaded["attachmentId"]]))
        await ws.close()
        return out
    finally:
        await http.close()
        server.stop()


def rows_of(m: dict) -> list[tuple[str, float, str]]:
    p50 = statistics.median
    raw, project = p50(m["raw"]), p50(m["project"])
    raw_text, project_text = p50(m["raw_text"]), p50(m["project_text"])
    return [
        ("image size (stored, sent)", m["size"] / 1e6, "MB"),
        (f"raw SDK: warm client, message with the image, to first text p50 of {SAMPLES}", raw, "ms"),
        (f"project: warm thread, message with the image, to first text p50 of {SAMPLES}", project, "ms"),
        ("project vs raw, with the image", project / raw, "x"),
        ("project - (1.1 x raw + 15 ms), with the image (<= 0: on target)", project - (1.1 * raw + 15), "ms"),
        ("raw SDK: warm client, text only, to first text p50", raw_text, "ms"),
        ("project: warm thread, text only, to first text p50", project_text, "ms"),
        ("project vs raw, text only", project_text / raw_text, "x"),
    ]


def write_results(rows) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = [f"# Attachments benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}. Offline model, websocket client, `python -m bench attachments`.", "",
             "| measure | value | unit |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value:,.2f} | {unit} |" for name, value, unit in rows]
    (RESULTS / "attachments.md").write_text("\n".join(lines) + "\n")


def run():
    async def measure():
        with ModelProcess() as model:
            return await measure_with(model.base_url)

    rows = rows_of(asyncio.run(measure()))
    write_results(rows)
    return rows
