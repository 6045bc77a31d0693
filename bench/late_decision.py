"""A person who decides ten minutes late (issue 16): too slow for ``make test``,
run once as a script, its result recorded in README and
``bench/results/late_decision.md``.

    python -m bench.late_decision [--wait SECONDS]

A live daphne server (``OMNI_APPROVAL_TIMEOUT_SECONDS=900``, the offline
model) runs a turn that asks to delete another thread; the call waits. Every
30 s the script checks that the other thread still exists and that the
server holds no Claude process for the turn. After ``--wait`` (600 s) it
allows the call over REST and reads the rest of the turn from the same SSE
stream: the tool runs once, only after the decision, and the reply follows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import Server, new_id  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "late_decision.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, default=600.0, help="seconds before the decision")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="omni-late-"))
    server = Server(tmp / "server", f"file:{tmp / 'db.sqlite'}",
                    {"OMNI_APPROVAL_TIMEOUT_SECONDS": str(args.wait + 300)})
    server.start()
    lines = []
    try:
        resource, thread, target = new_id("user"), new_id("thread"), new_id("old")
        server.chat("an old conversation", resource, target, agent="datadog").assert_ok()
        started = time.monotonic()
        stream = server.open_sse("/api/chat", {
            "message": f'Delete it [tool delete_conversation {{"threadId": "{target}"}}]',
            "resourceId": resource, "threadId": thread}, timeout=args.wait + 120)
        request = stream.read_until("approval_request")
        checks = 0
        while time.monotonic() - started < args.wait:
            time.sleep(min(30, args.wait - (time.monotonic() - started)) if args.wait > 1 else 0)
            status, _ = server.metadata(target, resource)
            _, _, health = server.request("GET", "/api/health")
            assert status == 200, "the call ran before anyone decided"
            assert health["processes"]["running"] == 0, health
            checks += 1
        waited = time.monotonic() - started
        status, _, decided = server.request("POST", "/api/chat/approval", {
            "threadId": thread, "resourceId": resource, "approvalId": request["approvalId"],
            "decision": "allow"})
        assert status == 200, decided
        rest = stream.result()
        stream.close()
        kinds = [e["type"] for e in rest.events if e["type"] not in ("chunk", "text")]
        status, _ = server.metadata(target, resource)
        ran = [e for e in rest.events if e["type"] == "tool_result"]
        lines = [
            f"# A decision {waited / 60:.1f} minutes late ({datetime.now(timezone.utc):%Y-%m-%d})",
            "",
            f"* the call waited {waited:.0f} s; {checks} checks meanwhile: the other thread was still "
            "there and the server ran no Claude process for the turn",
            f"* events of the turn, on one SSE stream: {', '.join(kinds)}",
            f"* the tool ran {len(ran)} time(s), after the decision; the other thread afterwards: "
            f"{'deleted' if status == 404 else 'still there'}",
            f"* the reply: {rest.text!r}",
        ]
        assert kinds[-1] == "done" and len(ran) == 1 and status == 404
    finally:
        server.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
