"""Long conversations resumed cold (issue 18): a thread of 10, 100 and 1,000
turns resumed by a server that has never seen it — a fresh data dir, the
transcript only in the database — against the raw SDK resuming the same
transcript from its own local file (``query(resume=...)`` with the entries
in a ``CLAUDE_CONFIG_DIR``). Time to the first text of the next message.

The transcript: a real three-turn conversation of the CLI, its second turn
copied N times with new uuids chained by ``parentUuid`` (the CLI follows
that chain; the offline model's reply then names every earlier question,
so the whole context is there). The server gets it the way a deployment
moving from local files does (``manage.py import_local_sessions``), and
resumes it from the store (adopting it into its own project key on the
first turn, as a cold resume on a new machine does). No warm clients, so
every sample is a cold resume.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, project_key_for_directory, query

from bench.pool import ModelProcess, _first_text, _ms, connect, start_server, ws_turn

SIZES = (10, 100, 1000)
SAMPLES = 3
ROOT = Path(__file__).resolve().parent.parent


def raw_options(work: Path, model_url: str, resume: str | None = None) -> ClaudeAgentOptions:
    return ClaudeAgentOptions(
        env={"ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": "offline",
             "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CONFIG_DIR": str(work / "claude")},
        cwd=str(work), tools=[], setting_sources=[], include_partial_messages=True, resume=resume,
        system_prompt="You are a benchmark.")


async def long_transcript(model_url: str, turns: int) -> tuple[Path, str, Path]:
    """A session of ``turns`` turns in a CLAUDE_CONFIG_DIR of its own:
    ``(work dir, session id, transcript file)``."""
    work = Path(tempfile.mkdtemp(prefix=f"omni-bench-long-{turns}-"))
    client = ClaudeSDKClient(raw_options(work, model_url))
    await client.connect()
    session = None
    try:
        for i in range(3):
            await client.query(f"turn {i}")
            async for message in client.receive_response():
                session = getattr(message, "session_id", None) or session
    finally:
        await client.disconnect()
    path = work / "claude" / "projects" / project_key_for_directory(str(work)) / f"{session}.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    typed = [i for i, e in enumerate(entries) if e.get("type") == "user" and e.get("promptSource") != "system"]
    block = [e for e in entries[typed[1]:typed[2]] if e.get("uuid")]
    head = entries[:typed[2]]
    leaf = [e for e in head if e.get("uuid")][-1]["uuid"]
    out = list(head)
    for k in range(turns - 2):
        renamed = {}
        for entry in block:
            new = copy.deepcopy(entry)
            renamed[entry["uuid"]] = new["uuid"] = str(uuid.uuid4())
            new["parentUuid"] = leaf if entry is block[0] else renamed.get(entry.get("parentUuid"), leaf)
            message = new.get("message")
            if new.get("type") == "assistant" and isinstance(message, dict):
                message["id"] = f"msg_copy_{k}_{message.get('id')}"
            if new.get("type") == "user" and isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = f"question {k}"
            out.append(new)
            leaf = new["uuid"]
    out.append({"type": "last-prompt", "lastPrompt": f"question {turns - 3}", "leafUuid": leaf,
                "sessionId": session})
    path.write_text("\n".join(json.dumps(e) for e in out) + "\n")
    return work, session, path


async def raw_resume(work: Path, session: str, path: Path, model_url: str) -> float:
    """The raw SDK resuming from the local file (restored after, so every
    sample resumes the same transcript)."""
    saved = path.read_bytes()
    try:
        started, first = time.perf_counter(), None
        async for message in query(prompt="how many questions?", options=raw_options(work, model_url, session)):
            if first is None and _first_text(message):
                first = time.perf_counter() - started
        return _ms(first)
    finally:
        path.write_bytes(saved)


def import_into(server, work: Path, session: str, thread: str, resource: str) -> None:
    env = server.env()
    subprocess.run([str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python",
                    "manage.py", "import_local_sessions", "--config-dir", str(work / "claude")],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    code = ("from sessions_app.models import SessionMapping; "
            f"SessionMapping.objects.create(thread_id={thread!r}, resource_id={resource!r}, "
            f"session_id={session!r}, title='long')")
    subprocess.run([str(ROOT / ".venv/bin/python"), "manage.py", "shell", "-c", code],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)


async def measure_with(model_url: str) -> dict:
    out = {}
    for turns in SIZES:
        work, session, path = await long_transcript(model_url, turns)
        raw = [await raw_resume(work, session, path, model_url) for _ in range(SAMPLES)]
        server = start_server(f"long-{turns}", model_url, OMNI_SPARE_CLIENTS="0", OMNI_WARM_CLIENTS="0")
        try:
            thread, resource = f"long-{turns}", "bench"
            import_into(server, work, session, thread, resource)
            http, ws = await connect(server)
            try:
                project = []
                for i in range(SAMPLES):
                    status, first = await ws_turn(ws, thread, resource, "how many questions?")
                    assert status == "done", status
                    project.append(first)
            finally:
                await ws.close()
                await http.close()
        finally:
            server.stop()
            shutil.rmtree(work, ignore_errors=True)
        out[turns] = {"raw": raw, "project": project}
    return out


def rows_of(m: dict) -> list[tuple[str, float, str]]:
    rows = []
    for turns, r in m.items():
        raw, project = statistics.median(r["raw"]), statistics.median(r["project"])
        rows += [
            (f"{turns}-turn thread resumed cold: raw SDK from its local file, to first text p50", raw, "ms"),
            (f"{turns}-turn thread resumed cold: project from the store (fresh data dir), p50", project, "ms"),
            (f"{turns}-turn thread resumed cold: project vs raw", project / raw, "x"),
        ]
    return rows


def run():
    async def measure():
        with ModelProcess() as model:
            return await measure_with(model.base_url)

    return rows_of(asyncio.run(measure()))
