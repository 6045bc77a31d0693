"""``POST /api/attachments`` and ``GET /api/attachments/<id>`` (contract §11)."""

from __future__ import annotations

import asyncio
import functools
from urllib.parse import quote

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import StreamingHttpResponse
from ninja import Router, Schema
from ninja.responses import Response

from ..errors import BadRequest, Forbidden
from ..resources import request_user, resolve_resource
from ..schemas import ErrorOut, Id
from . import inspect, services, uploads

router = Router(tags=["attachments"])
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 413, 415, 503)}


class AttachmentOut(Schema):
    attachmentId: str
    name: str
    mediaType: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    pages: int | None = None

    @staticmethod
    def of(a) -> dict:
        out = {"attachmentId": a.attachment_id, "name": a.name, "mediaType": a.media_type,
               "size": a.size, "sha256": a.sha256}
        if a.is_image:
            out.update(width=a.width, height=a.height)
        elif a.media_type == "application/pdf":
            out["pages"] = a.pages
        return out


UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "PNG, JPEG, GIF, WebP, PDF, or UTF-8 text (plain, Markdown, CSV); "
                                        "the type is read from the content"},
                "resourceId": {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
            },
        }}},
    },
}


def _receive_sync(request, query_resource) -> tuple[uploads.Received, str | None]:
    received = uploads.receive_sync(request)
    # the form's field when sent (an empty one is invalid, not absent), else the query's
    requested = received.fields["resourceId"] if "resourceId" in received.fields else query_resource
    if requested is not None and not isinstance(requested, str):
        received.cleanup()
        raise BadRequest("resourceId must be a string")
    return received, requested


async def _accept(request, user, query_resource) -> dict:
    """Receive, inspect and keep an upload. Parsing, decoding and the
    storage are file, CPU or network work: worker threads of their own,
    not the loop and not the database's thread, which writes the row."""
    background = functools.partial(sync_to_async, thread_sensitive=False)
    received, requested = await background(_receive_sync)(request, query_resource)
    inspected = None
    try:
        resource = resolve_resource(user, _valid_id(requested))
        name = inspect.clean_name(received.name)
        inspected = await background(inspect.inspect)(received.path, received.size, name)
        saved = await background(services.save_file_sync)(inspected)
        attachment = await sync_to_async(services.create_row_sync)(resource, saved, inspected, name)
        return AttachmentOut.of(attachment)
    finally:
        await background(_cleanup)(received, inspected)


def _cleanup(received, inspected) -> None:
    received.cleanup()
    if inspected is not None:
        inspected.cleanup()


def _cross_site(request) -> bool:
    """With ``OMNI_AUTH=off`` nothing else stops another site's page from
    posting a form here (a JSON call it cannot send without asking first):
    a browser's ``Origin`` must be this site's (Django's CSRF origin check).
    Signed-in calls have CSRF checked by their authentication."""
    if settings.OMNI_AUTH != "off" or "HTTP_ORIGIN" not in request.META:
        return False
    from django.middleware.csrf import CsrfViewMiddleware

    return not CsrfViewMiddleware(lambda r: None)._origin_verified(request)


def _valid_id(value: str | None) -> str | None:
    import re

    if value is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", value):
        raise BadRequest("resourceId must match [A-Za-z0-9._:-]{1,128}")
    return value


@router.post("/attachments", response={201: AttachmentOut, **ERRORS}, openapi_extra=UPLOAD_DOC,
             summary="Upload an attachment")
async def upload(request):
    """An image, PDF or text file for a later message (`attachments` on a chat request).
    The type is read from the content: 415 for any other, 400 `invalid_attachment` for a file
    that does not parse as its type, 413 over `OMNI_ATTACHMENT_MAX_MB` (`attachment_too_large`;
    `request_too_large` before the body is read when the request's length, or a chunked body as
    it comes, is over that plus 64 kB for the form). Images are scaled down to 1568 px on their
    longer side and stored without metadata (EXIF, GPS, XMP, comments, text chunks)."""
    user = await request_user(request)
    if _cross_site(request):
        raise Forbidden("an upload from another site's page is refused", code="csrf_failed")
    query_resource = _valid_id(request.GET.get("resourceId"))
    # Shielded: a client gone meanwhile does not stop the work half-way (a
    # file without its row, a temporary file left); an upload never sent is
    # swept after OMNI_ATTACHMENT_ORPHAN_HOURS like any other.
    out = await asyncio.shield(asyncio.ensure_future(_accept(request, user, query_resource)))
    return Response(out, status=201)


@router.get("/attachments/{attachmentId}", response=ERRORS,
            openapi_extra={"responses": {200: {"description": "the stored bytes, with their type",
                                               "content": {"*/*": {"schema": {"type": "string",
                                                                              "format": "binary"}}}}}},
            summary="Download an attachment")
async def download(request, attachmentId: Id, resourceId: Id | None = None):
    """The stored bytes, to the owning resource only (404 for anyone else)."""
    user = await request_user(request)
    resource = resolve_resource(user, resourceId)
    attachment = await sync_to_async(services.owned_sync)(resource, attachmentId)
    opened = await sync_to_async(services.open_sync, thread_sensitive=False)(attachment)
    return bytes_response(attachment, opened, cache_control="private, max-age=86400, immutable")


def bytes_response(attachment, opened, *, cache_control: str) -> StreamingHttpResponse:
    """An attachment's bytes from its open file (closed at the end), read
    off the event loop in chunks, with its type, ``nosniff``, a sandboxing
    CSP and ``Content-Disposition`` (inline for images, a download for
    everything else): the API's download and the admin's staff view."""
    read = sync_to_async(opened.read, thread_sensitive=False)

    async def body():
        try:
            while chunk := await read(services.READ_CHUNK):
                yield chunk
        finally:
            await sync_to_async(opened.close, thread_sensitive=False)()

    media_type = attachment.media_type
    response = StreamingHttpResponse(
        body(), content_type=f"{media_type}; charset=utf-8" if media_type.startswith("text/") else media_type)
    response["Content-Length"] = str(attachment.size)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = cache_control
    disposition = "inline" if attachment.is_image else "attachment"
    ascii_name = attachment.name.encode("ascii", "replace").decode().replace('"', "'").replace("?", "_")
    response["Content-Disposition"] = (f'{disposition}; filename="{ascii_name}"; '
                                       f"filename*=UTF-8''{quote(attachment.name)}")
    return response
