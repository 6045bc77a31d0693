"""Request bodies over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (``OMNI_MAX_BODY_BYTES``)
are refused with ``413`` before they are read (issue 15, item 10).

Why in daphne, not in Django: daphne's HTTP parser (Twisted's
``HTTPChannel``) takes a request's whole body (into a temporary file past
100 kB) before it calls the application at all, and Django's ASGI handler
then reads it whole again (``SpooledTemporaryFile``: 2.5 MB in memory, the
rest on disk) before any middleware or view runs. So a middleware or the
API's ``401`` comes only after a 256 MiB body was taken in. This hook
decides at the headers instead:

* ``Content-Length`` over the limit: ``413`` at once, nothing read;
* a chunked body (no length): counted as it comes, ``413`` the moment it
  passes the limit; what came so far is dropped.

The answer is the contract's JSON error (``request_too_large``) with
``Connection: close``; the connection then reads and drops what the client
still sends for up to :data:`LINGER_SECONDS` (so a client busy sending can
read the answer, as a proxy's lingering close does) and is closed. Under
any other ASGI server, Django's own ``DATA_UPLOAD_MAX_MEMORY_SIZE`` check
still refuses such a body when a view reads it. The proxy in front should
limit bodies too (README, Security).

Installed from ``omni/asgi.py`` (daphne imports the application before it
serves); ``tests/test_body_limit.py`` checks it on a live server, so a
daphne or Twisted upgrade that changes the hooks used here fails there.
"""

import json
import logging

from django.conf import settings

log = logging.getLogger("omni.http")

LINGER_SECONDS = 2.0


def limit() -> int:
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


def answer(limit_bytes: int) -> bytes:
    body = json.dumps({"error": {
        "code": "request_too_large",
        "message": f"the request body is over the server's limit of {limit_bytes} bytes",
    }}).encode()
    head = (
        "HTTP/1.1 413 Content Too Large\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


def refuse(request, size: str) -> None:
    """Answer ``request`` with 413 and stop reading its connection."""
    from twisted.internet import reactor

    request._omni_refused = True
    request.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the answer
    channel = request.channel
    transport = channel.transport
    if transport is None:
        return
    log.warning("[HTTP] Refused a request body of %s (limit %d bytes) from %s",
                size, limit(), getattr(transport.getPeer(), "host", "?"))
    transport.write(answer(limit()))
    channel.dataReceived = lambda data: None  # the rest is neither parsed nor kept
    close_writes = getattr(transport, "loseWriteConnection", None)
    if close_writes is None:
        transport.loseConnection()
        return
    close_writes()  # the answer, then FIN; reading (and dropping) goes on a moment
    reactor.callLater(LINGER_SECONDS, transport.abortConnection)


def install() -> None:
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:  # not served by daphne
        return
    if getattr(WebRequest, "_omni_body_limit", False):
        return
    got_length = WebRequest.gotLength
    handle_content_chunk = WebRequest.handleContentChunk
    request_received = WebRequest.requestReceived

    def gotLength(self, length):
        self._omni_refused = False
        self._omni_received = 0
        if length is not None and length > limit():
            got_length(self, 0)  # an empty body: nothing is kept
            refuse(self, f"{length} bytes (Content-Length)")
            return
        got_length(self, length)

    def handleContentChunk(self, data):
        if getattr(self, "_omni_refused", False):
            return
        self._omni_received = getattr(self, "_omni_received", 0) + len(data)
        if self._omni_received > limit():
            self.content.truncate(0)
            refuse(self, f"more than {limit()} bytes (chunked)")
            return
        handle_content_chunk(self, data)

    def requestReceived(self, command, path, version):
        if getattr(self, "_omni_refused", False):
            return  # answered already: the application never sees it
        return request_received(self, command, path, version)

    WebRequest.gotLength = gotLength
    WebRequest.handleContentChunk = handleContentChunk
    WebRequest.requestReceived = requestReceived
    WebRequest._omni_body_limit = True
