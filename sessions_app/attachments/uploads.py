"""Reading a ``multipart/form-data`` upload without holding it in memory.

Django's :class:`~django.http.multipartparser.MultiPartParser` reads the
request body in chunks; :class:`LimitedFileHandler` writes the one file
field (``file``) to a private temporary file as it comes, counting: past
``OMNI_ATTACHMENT_MAX_BYTES`` it stops with 413 and deletes what it wrote.
(A request that says its length is refused before it is read at all:
``omni/bodylimit.py``.) Runs on a worker thread.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopFutureHandlers
from django.http.multipartparser import MultiPartParser, MultiPartParserError

from ..errors import BadRequest, TooLarge

FIELD = "file"
# What the multipart framing and the other fields may add to the file's size.
OVERHEAD_BYTES = 64 * 1024


def max_bytes() -> int:
    return settings.OMNI_ATTACHMENT_MAX_BYTES


def max_body_bytes() -> int:
    """The largest upload request body (the file plus its framing)."""
    return max_bytes() + OVERHEAD_BYTES


def too_large() -> TooLarge:
    return TooLarge(f"the file is over the limit of {settings.OMNI_ATTACHMENT_MAX_MB:g} MB "
                    "(OMNI_ATTACHMENT_MAX_MB)", code="attachment_too_large")


@dataclass
class Received:
    """The uploaded file, on disk, and the form's other fields."""

    path: str
    name: str
    size: int
    fields: dict

    def cleanup(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Spooled:
    """What the handler returns for the file (the parser wants an object)."""

    def __init__(self, path, name, size):
        self.path, self.name, self.size = path, name, size


class LimitedFileHandler(FileUploadHandler):
    """The ``file`` field to a temporary file, at most :func:`max_bytes`."""

    chunk_size = 64 * 1024

    def __init__(self, request=None):
        super().__init__(request)
        self.path: str | None = None
        self._out = None
        self._size = 0
        self.seen = 0  # file fields seen

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > max_body_bytes():
            raise too_large()
        return None

    def new_file(self, field_name, file_name, content_type, content_length, charset=None,
                 content_type_extra=None):
        super().new_file(field_name, file_name, content_type, content_length, charset, content_type_extra)
        self.seen += 1
        if field_name != FIELD or self.seen > 1:
            raise BadRequest(f"send one file, in the form field {FIELD!r}")
        fd, self.path = tempfile.mkstemp(prefix="omni-upload-", dir=settings.FILE_UPLOAD_TEMP_DIR)
        self._out = os.fdopen(fd, "wb")
        raise StopFutureHandlers()

    def receive_data_chunk(self, raw_data, start):
        self._size += len(raw_data)
        if self._size > max_bytes():
            raise too_large()
        self._out.write(raw_data)
        return None

    def file_complete(self, file_size):
        self._out.close()
        self._out = None
        return _Spooled(self.path, self.file_name, self._size)

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _arrived(request) -> int:
    """The size of a request body Django holds in its spooled file."""
    stream = request._stream
    try:
        here = stream.tell()
        size = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return max(0, size - here)
    except (AttributeError, OSError, ValueError):
        return 0


def receive_sync(request) -> Received:
    """Parse the upload (on a worker thread). 400 without a ``file`` field
    or for a body that is not well-formed multipart; 413 past the limit.
    Nothing is left on disk when it raises."""
    content_type = request.META.get("CONTENT_TYPE", "")
    if not content_type.lower().startswith("multipart/form-data"):
        from .inspect import Unsupported

        raise Unsupported("send the file as multipart/form-data (field 'file')")
    handler = LimitedFileHandler(request)
    meta = request.META
    if not meta.get("CONTENT_LENGTH"):
        # A chunked body (no length; the server counted it against the
        # limit as it came): Django's parser reads a body of the length it
        # is told, so tell it what arrived.
        meta = {**meta, "CONTENT_LENGTH": str(_arrived(request))}
    try:
        parser = MultiPartParser(meta, request, [handler], request.encoding)
        fields, files = parser.parse()
        spooled = files.get(FIELD)
        if spooled is None:
            raise BadRequest(f"no file: send it in the form field {FIELD!r}")
        return Received(spooled.path, spooled.name or "", spooled.size,
                        {key: fields.get(key) for key in fields})
    except MultiPartParserError as exc:
        handler.discard()
        raise BadRequest(f"malformed multipart body: {exc}") from None
    except BaseException:
        handler.discard()
        raise
