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

The upload path (``POST /api/attachments``, contract §11) may send more:
``sessions_app.attachments.uploads.max_body_bytes()`` (the file's limit,
``OMNI_ATTACHMENT_MAX_MB``, plus room for the multipart framing), decided
the same way at the headers (Twisted knows the request line then:
``channel._command`` and ``channel._path``).

No form parsing in Twisted (issue 23): ``twisted.web.http.Request`` parses
a ``multipart/form-data`` or urlencoded POST body into ``request.args``
before daphne sees the request (the whole body read, copied and run through
the ``email`` parser, on the event loop: 130 MB of memory and 5 s of a
blocked loop for one 10 MB upload). Daphne never reads ``request.args``;
:func:`install` turns that parse off (``parsePOSTFormSubmission``) and
Django parses the body, streamed, as before.

The body to the application as it reads it (issue 23): daphne's
``WebRequest.process`` reads the request's whole body (which Twisted kept
in a temporary file past 100 kB) and puts it into the application's queue
at once, in 8 kB messages: ten parallel 10 MB uploads held 100 MB of
``bytes`` in memory before Django read the first. :func:`install` lets
``process`` see an empty body and gives the queue a store
(:class:`BodyFeed`) that reads the next 64 kB from Twisted's file when the
application asks for it; Django's ASGI handler then writes each chunk to
its own spooled file (on disk past ``FILE_UPLOAD_MAX_MEMORY_SIZE``). The
reads are page-cache reads of the file Twisted just wrote on the same loop.
Bodies under 8 kB and websocket upgrades go daphne's way unchanged.

Installed from ``omni/asgi.py`` (daphne imports the application before it
serves); ``tests/test_body_limit.py`` checks it on a live server, so a
daphne or Twisted upgrade that changes the hooks used here fails there.
"""

import collections
import json
import logging
from urllib.parse import unquote

from django.conf import settings

log = logging.getLogger("omni.http")

LINGER_SECONDS = 2.0
UPLOAD_PATH = "/api/attachments"
FEED_CHUNK = 64 * 1024  # what BodyFeed reads per message


def limit(method: bytes | None = None, path: bytes | None = None) -> int:
    """The largest body of a request (``method``, ``path`` of its request
    line): the upload's for ``POST /api/attachments``, else
    ``DATA_UPLOAD_MAX_MEMORY_SIZE``."""
    if method == b"POST" and path is not None and is_upload_path(path):
        from sessions_app.attachments.uploads import max_body_bytes

        return max(int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE), max_body_bytes())
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


def is_upload_path(path: bytes) -> bool:
    """``path`` (the request line's, query and all) is the upload's, as
    daphne decodes it for Django (percent-decoded)."""
    try:
        return unquote(path.split(b"?", 1)[0].decode("ascii")) == UPLOAD_PATH
    except UnicodeDecodeError:
        return False


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


def refuse(request, size: str, limit_bytes: int) -> None:
    """Answer ``request`` with 413 and stop reading its connection."""
    from twisted.internet import reactor

    request._omni_refused = True
    request.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the answer
    channel = request.channel
    transport = channel.transport
    if transport is None:
        return
    log.warning("[HTTP] Refused a request body of %s (limit %d bytes) from %s",
                size, limit_bytes, getattr(transport.getPeer(), "host", "?"))
    transport.write(answer(limit_bytes))
    channel.dataReceived = lambda data: None  # the rest is neither parsed nor kept
    close_writes = getattr(transport, "loseWriteConnection", None)
    if close_writes is None:
        transport.loseConnection()
        return
    close_writes()  # the answer, then FIN; reading (and dropping) goes on a moment
    reactor.callLater(LINGER_SECONDS, transport.abortConnection)


class Withheld:
    """What daphne's ``process`` reads as the body: nothing (the body goes
    to the application through :class:`BodyFeed` instead)."""

    def __init__(self, content):
        self._content = content

    @property
    def closed(self) -> bool:
        return self._content.closed

    def seek(self, *args) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""


class BodyFeed:
    """The store of an application's ``asyncio.Queue`` (its ``_queue``, a
    deque by default: ``Queue`` uses ``append``, ``popleft``, ``len`` and
    truth): ``http.request`` messages read from ``content`` one at a time as
    the application takes them, then whatever daphne puts later (a
    ``http.disconnect``). A body whose file was closed meanwhile (the
    connection lost) ends there: the later messages come next."""

    def __init__(self, content, size: int):
        self.content = content
        self.left = size
        self.later = collections.deque()

    def _feeding(self) -> bool:
        if self.content is not None and self.content.closed:
            self.content = None
        return self.content is not None

    def __len__(self) -> int:
        return int(self._feeding()) + len(self.later)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self):  # asyncio.Queue's repr lists it
        return iter(self.later)

    def append(self, item) -> None:
        self.later.append(item)

    def popleft(self):
        if not self._feeding():
            return self.later.popleft()
        chunk = self.content.read(min(FEED_CHUNK, self.left))
        self.left -= len(chunk)
        more = self.left > 0 and len(chunk) > 0
        if not more:
            self.content = None  # Twisted closes its file when the request is done
        return {"type": "http.request", "body": chunk, "more_body": more}


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
    process = WebRequest.process

    def gotLength(self, length):
        self._omni_refused = False
        self._omni_received = 0
        channel = self.channel
        self._omni_limit = limit(getattr(channel, "_command", None), getattr(channel, "_path", None))
        if length is not None and length > self._omni_limit:
            got_length(self, 0)  # an empty body: nothing is kept
            refuse(self, f"{length} bytes (Content-Length)", self._omni_limit)
            return
        got_length(self, length)

    def handleContentChunk(self, data):
        if getattr(self, "_omni_refused", False):
            return
        self._omni_received = getattr(self, "_omni_received", 0) + len(data)
        most = getattr(self, "_omni_limit", None) or limit()
        if self._omni_received > most:
            self.content.truncate(0)
            refuse(self, f"more than {most} bytes (chunked)", most)
            return
        handle_content_chunk(self, data)

    def requestReceived(self, command, path, version):
        if getattr(self, "_omni_refused", False):
            return  # answered already: the application never sees it
        # Twisted would parse a form body into request.args (which daphne
        # never reads): a multipart body whole in memory several times over
        # and through the email parser, on the event loop.
        self._parsePOSTFormSubmission = False
        return request_received(self, command, path, version)

    def streamed_process(self):
        content = self.content
        upgrade = (self.requestHeaders.getRawHeaders(b"Upgrade") or [b""])[0].lower()
        size = getattr(self, "_omni_received", 0)
        if upgrade == b"websocket" or size <= self.channel.factory.server.request_buffer_size:
            return process(self)
        self.content = Withheld(content)
        try:
            # create_application is synchronous: by the time process returns,
            # the queue exists and holds one empty, final http.request.
            done = process(self)
        finally:
            self.content = content
        queue = self.application_queue
        if queue is not None and not content.closed:
            store = queue._queue
            if len(store) == 1 and store[0].get("type") == "http.request" and not store[0]["body"]:
                content.seek(0, 0)
                queue._queue = BodyFeed(content, size)
            else:  # not what this hook knows: say so, and serve what daphne queued
                log.error("[HTTP] daphne's request queue is not as expected; the body is not streamed")
        return done

    WebRequest.gotLength = gotLength
    WebRequest.handleContentChunk = handleContentChunk
    WebRequest.requestReceived = requestReceived
    WebRequest.process = streamed_process
    WebRequest._omni_body_limit = True
