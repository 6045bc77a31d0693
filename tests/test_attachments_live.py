"""The upload path on a live daphne (issue 23): ``POST /api/attachments``
may send up to the upload's limit (``OMNI_ATTACHMENT_MAX_MB`` plus the
multipart framing), not the 2.5 MiB of every other call; over it, ``413``
at the headers (``Content-Length``) before the body is read, and a chunked
upload counted and cut at the limit. A multipart body is never parsed by
Twisted (daphne's HTTP layer), so the server's memory stays flat for a
body of several MB; the body reaches Django as it reads it."""

import select
import socket
import time

import pytest

from tests import files
from tests.e2e import serving
from tests.test_body_limit import head, read_answer, rss_kb

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic, pytest.mark.django_db(transaction=True)]

MAX_MB = 4
UPLOAD_LIMIT = int(MAX_MB * 1024 * 1024) + 64 * 1024  # uploads.max_body_bytes()
OTHER_LIMIT = 2_621_440


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory, extra_env={"OMNI_ATTACHMENT_MAX_MB": str(MAX_MB)})


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def post_upload(server, body: bytes, content_type: str, path: str = "/api/attachments?resourceId=live"):
    return server.request("POST", path, raw=body, headers={"Content-Type": content_type}, timeout=60)


def test_the_upload_path_takes_its_own_limit_and_the_body_streams(server):
    pdf = files.pdf(pages=4, size=3 * 1024 * 1024)  # over every other call's limit, under the upload's
    body, content_type = files.multipart(pdf, "big.pdf")
    assert OTHER_LIMIT < len(body) < UPLOAD_LIMIT
    post_upload(server, *files.multipart(files.pdf(), "warm.pdf"))  # imports
    before = rss_kb(server.proc.pid)
    reset_peak(server.proc.pid)
    status, _, answer = post_upload(server, body, content_type)
    assert status == 201, answer
    assert answer["pages"] == 4 and answer["size"] == len(pdf)
    # Twisted parsed a multipart body whole (and through the email parser)
    # before: ~40 MB at the peak for this one
    assert peak_kb(server.proc.pid) - before < 15_000
    # the same body anywhere else is over the limit of other calls
    status, _, answer = server.request("POST", "/api/chat", raw=body, headers={"Content-Type": content_type})
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer
    status, _, answer = post_upload(server, body, content_type, path="/api/attachments/x?resourceId=live")
    assert status == 413 and str(OTHER_LIMIT) in answer["error"]["message"], answer


def test_an_upload_over_its_limit_is_413_at_the_headers(server):
    before = rss_kb(server.proc.pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(head(server, "/api/attachments?resourceId=live",
                          "Content-Type: multipart/form-data; boundary=x",
                          f"Content-Length: {UPLOAD_LIMIT + 1}") + b"--x\r\n")
        status, headers, body = read_answer(sock, timeout=5)
        assert time.monotonic() - started < 2
        assert status == 413 and headers["connection"] == "close", body
        assert body["error"]["code"] == "request_too_large" and str(UPLOAD_LIMIT) in body["error"]["message"]
        assert sock.recv(1) == b""
    assert rss_kb(server.proc.pid) - before < 10_000


def test_a_chunked_upload_is_read_and_one_over_the_limit_is_cut(server):
    pdf = files.pdf(pages=2, size=300_000)
    body, content_type = files.multipart(pdf, "chunked.pdf")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head(server, "/api/attachments?resourceId=live", f"Content-Type: {content_type}",
                          "Transfer-Encoding: chunked"))
        for at in range(0, len(body), 50_000):
            piece = body[at:at + 50_000]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, _, answer = read_answer(sock, timeout=30)
        assert status == 201 and answer["pages"] == 2 and answer["size"] == len(pdf), answer

    before = rss_kb(server.proc.pid)
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head(server, "/api/attachments?resourceId=live",
                          "Content-Type: multipart/form-data; boundary=x", "Transfer-Encoding: chunked"))
        while sent < 64 * 1024 * 1024:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(piece)
        status, _, answer = read_answer(sock, timeout=5)
    assert status == 413 and str(UPLOAD_LIMIT) in answer["error"]["message"], answer
    assert UPLOAD_LIMIT <= sent < 32 * 1024 * 1024, sent
    assert rss_kb(server.proc.pid) - before < 10_000
    assert server.request("GET", "/api/health")[0] == 200
