"""Request bodies against a live daphne (issue 15, items 3 and 10): a body
over ``OMNI_MAX_BODY_BYTES`` is ``413`` before it is read, whether it says
its length (``Content-Length``) or not (chunked), and the server's memory
does not grow; a body under the limit (the longest message, escaped) is
read as usual; a ``text/plain`` chat is ``415`` and starts nothing, with
``OMNI_AUTH=off`` as ``make run`` serves."""

import json
import select
import socket
import time

import pytest

from tests.e2e import serving

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic, pytest.mark.django_db(transaction=True)]  # refused before any database work

LIMIT = 2_621_440  # the default OMNI_MAX_BODY_BYTES


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory)  # OMNI_AUTH=off


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def head(server, path: str, *lines: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *lines]) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict, dict]:
    """``(status, headers, JSON body)`` of the answer on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(rest) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer"
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest)


def assert_too_large(status, headers, body):
    assert status == 413, (status, body)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large" and str(LIMIT) in body["error"]["message"]


def test_a_huge_content_length_is_413_at_once(server):
    before = rss_kb(server.proc.pid)
    for path in ("/api/chat", "/api/sessions/metadata", "/admin/login/", "/"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            # says 256 MiB, sends a few bytes, waits for the answer
            sock.sendall(head(server, path, "Content-Type: application/json",
                              f"Content-Length: {256 * 1024 * 1024}") + b'{"message": "')
            status, headers, body = read_answer(sock, timeout=5)
            assert time.monotonic() - started < 2  # expected ~50 ms: refused before the body is read
            assert_too_large(status, headers, body)
            assert sock.recv(1) == b""  # and the connection is closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # curl's way for big bodies: wait for "100 Continue" before sending; none comes
        sock.sendall(head(server, "/api/chat", "Content-Type: application/json", "Expect: 100-continue",
                          f"Content-Length: {LIMIT + 1}"))
        assert_too_large(*read_answer(sock, timeout=5))
    assert rss_kb(server.proc.pid) - before < 10_000
    assert server.request("GET", "/api/health")[0] == 200


def test_a_chunked_body_is_counted_and_cut_at_the_limit(server):
    """No length: the server counts what comes and answers 413 once it is
    past the limit, without keeping it; the client, still sending, reads the
    answer (the server drops the rest a moment before closing)."""
    before = rss_kb(server.proc.pid)
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head(server, "/api/chat", "Content-Type: application/json",
                          "Transfer-Encoding: chunked"))
        sent = 0
        started = time.monotonic()
        while sent < 64 * 1024 * 1024:  # 64 MiB at most: the answer comes long before
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(piece)
        assert_too_large(*read_answer(sock, timeout=5))
        assert time.monotonic() - started < 5  # expected well under 1 s: refused once the limit is read
    assert LIMIT <= sent < 32 * 1024 * 1024, sent
    assert rss_kb(server.proc.pid) - before < 10_000
    assert server.request("GET", "/api/health")[0] == 200


def test_a_body_under_the_limit_is_read(server):
    """The longest message, each character sent as an escaped surrogate pair
    (12 bytes: 1.2 MB), is under the limit: read and judged (here: a bad id)."""
    message = "\U0001F600" * 100_000
    body = json.dumps({"message": message, "resourceId": "bad id"}).encode()  # ensure_ascii: \ud83d\ude00
    assert 1_200_000 < len(body) < LIMIT
    status, _, data = server.request("POST", "/api/chat", raw=body)
    assert status == 400 and data["error"]["code"] == "bad_request", data


def test_a_text_plain_chat_is_415_and_runs_nothing(server):
    """What a cross-site form can send (``enctype="text/plain"``) to a
    developer's ``make run``: refused before any turn starts."""
    body = json.dumps({"message": "run me", "threadId": "csrf-1", "resourceId": "dev"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, _, data = server.request("POST", "/api/chat", raw=body,
                                         headers={"Content-Type": content_type})
        assert status == 415 and data["error"]["code"] == "unsupported_media_type", data
    assert server.cli_children() == []
    assert server.sessions("dev")["count"] == 0
