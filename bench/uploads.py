"""Uploads (issue 23): 10 parallel 10 MB PDFs and one 4000x3000 JPEG.

Starts a live daphne (``tests/e2e.py``'s ``Server``: ``manage.py migrate``,
then daphne, ``OMNI_AUTH=off``, a data dir of its own; a database of its own
on PostgreSQL when ``DATABASE_URL`` is one), warms it with one small upload
of each kind (Pillow and pypdf imported, the worker threads started), then
sends the 11 uploads at once (``POST /api/attachments``, one connection
each) and reports:

* each upload's time, request sent to answer read (ms);
* the server's peak RSS growth meanwhile: ``VmHWM`` after, less ``VmRSS``
  before, of the daphne process (its peak reset first through
  ``/proc/<pid>/clear_refs``), and the largest ``VmRSS`` sampled every 5 ms
  as a check. The target: at most 64 MB (the bodies streamed, not held).

``python -m bench uploads``; ``BENCH_UPLOADS_PDFS`` (10) and
``BENCH_UPLOADS_PDF_MB`` (10) change the load.
"""

from __future__ import annotations

import http.client
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PDFS = int(os.environ.get("BENCH_UPLOADS_PDFS", "10"))
PDF_MB = float(os.environ.get("BENCH_UPLOADS_PDF_MB", "10"))
TARGET_MB = 64


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def upload(port: int, content: bytes, name: str, resource: str) -> tuple[float, int, dict | str]:
    """``(seconds, status, answer)`` of one upload."""
    import json

    from tests.files import multipart

    body, content_type = multipart(content, name, {"resourceId": resource})
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/api/attachments", body, {"Content-Type": content_type})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    try:
        return elapsed, resp.status, json.loads(text)
    except ValueError:
        return elapsed, resp.status, text


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            time.sleep(0.005)


def _measure(tmp: Path) -> list[tuple[str, float, str]]:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests import files
    from tests.e2e import Server, run_database

    pdf = files.pdf(pages=20, size=int(PDF_MB * 1024 * 1024))
    photo = files.jpeg(4000, 3000, noise=True)
    pg = run_database()
    server = Server(tmp / "server", pg.url if pg else None)
    rows = []
    try:
        server.start()
        pid = server.proc.pid
        for content, name in ((files.pdf(), "warm.pdf"), (files.jpeg(2000, 1500, noise=True), "warm.jpg")):
            _, status, answer = upload(server.port, content, name, "bench-warm-up")
            if status != 201:
                raise RuntimeError(f"warm-up upload refused: {status} {answer}")
        time.sleep(0.5)
        before_kb = _status_kb(pid, "VmRSS")
        reset = _reset_peak(pid)
        sampler = Sampler(pid)
        sampler.start()
        jobs = [(pdf, f"report-{i}.pdf") for i in range(PDFS)] + [(photo, "photo.jpg")]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: upload(server.port, job[0], job[1], "bench"), jobs))
        wall = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        peak_kb = _status_kb(pid, "VmHWM") if reset else sampler.peak_kb
        for (_, name), (seconds, status, answer) in zip(jobs, results):
            if status != 201:
                raise RuntimeError(f"{name}: {status} {answer}")
        times = [seconds for seconds, _, _ in results]
        pdf_times = sorted(times[:PDFS])
        photo_answer = results[-1][2]
        rows += [(f"{PDF_MB:g} MB PDF #{i + 1} (of {PDFS} in parallel)", t * 1000, "ms")
                 for i, t in enumerate(times[:PDFS])]
        rows += [
            (f"{PDF_MB:g} MB PDF: median", pdf_times[len(pdf_times) // 2] * 1000, "ms"),
            (f"{PDF_MB:g} MB PDF: slowest", pdf_times[-1] * 1000, "ms"),
            (f"4000x3000 JPEG ({len(photo) / 1e6:.1f} MB) -> "
             f"{photo_answer['width']}x{photo_answer['height']}, alongside", times[-1] * 1000, "ms"),
            (f"all {len(jobs)} uploads, wall clock", wall * 1000, "ms"),
            ("server peak RSS growth (VmHWM - VmRSS before)" if reset
             else "server peak RSS growth (sampled VmRSS)", (peak_kb - before_kb) / 1024, "MB"),
            ("server peak RSS growth (VmRSS sampled every 5 ms)", (sampler.peak_kb - before_kb) / 1024, "MB"),
            (f"target: peak RSS growth at most {TARGET_MB} MB",
             1.0 if (peak_kb - before_kb) / 1024 <= TARGET_MB else 0.0, "1 = met"),
        ]
    finally:
        try:
            server.stop(timeout=30)
        finally:
            if pg:
                pg.drop()
    return rows


def run() -> list[tuple[str, float, str]]:
    with tempfile.TemporaryDirectory(prefix="omni-bench-uploads-") as tmp:
        return _measure(Path(tmp))


if __name__ == "__main__":
    for name, value, unit in run():
        print(f"{name:<70} {value:>10.1f} {unit}")
