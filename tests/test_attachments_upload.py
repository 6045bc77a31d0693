"""``POST /api/attachments`` and ``GET /api/attachments/<id>`` in process
(contract §11, issue 23): every refusal (415, 400 ``invalid_attachment``,
413) leaves no file, no temporary file and no row; what is stored is
re-encoded without metadata, scaled, upright; the download is the owner's
only, with its headers. The header-time 413 and the chunked one on a live
daphne: ``tests/test_attachments_live.py``."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import resource

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from sessions_app.models import Attachment
from tests import files

pytestmark = [pytest.mark.engine_agnostic, pytest.mark.django_db]

URL = "/api/attachments"


@pytest.fixture(autouse=True)
def upload_tmp(settings, tmp_path):
    """Uploads' temporary files in a directory of the test's own (checked empty after a refusal)."""
    path = tmp_path / "upload-tmp"
    path.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(path)
    return path


def upload(client, content: bytes, name: str = "file.bin", resource_id: str = "alice", **extra):
    body, content_type = files.multipart(content, name, {} if resource_id is None else {"resourceId": resource_id})
    return client.generic("POST", URL, body, content_type=content_type, **extra)


def stored(client, answer: dict, resource_id: str = "alice") -> bytes:
    response = client.get(f"{URL}/{answer['attachmentId']}", {"resourceId": resource_id})
    assert response.status_code == 200, response.content
    return read_body(response)


def read_body(response) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return asyncio.run(collect())


def open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def assert_nothing_left(attachments_dir, upload_tmp):
    assert [p for p in attachments_dir.rglob("*") if p.is_file()] == []
    assert list(upload_tmp.iterdir()) == []
    assert not Attachment.objects.exists()


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == code, response.json()


# --- refusals ---------------------------------------------------------------------

@pytest.mark.parametrize("content, name", [
    (b"PK\x03\x04" + os.urandom(2000), "archive.zip"),
    (b"MZ\x90\x00" + os.urandom(2000), "setup.exe"),
    (b"\x7fELF\x02\x01\x01" + os.urandom(2000), "tool"),
    (bytes(range(256)) * 16, "photo.png"),  # binary, named as an image
], ids=["zip", "exe", "elf", "binary-named-png"])
def test_other_types_are_415(client, attachments_dir, upload_tmp, content, name):
    assert_error(upload(client, content, name), 415, "unsupported_media_type")
    assert_nothing_left(attachments_dir, upload_tmp)


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain", "image/png"])
def test_a_body_that_is_not_multipart_is_415(client, attachments_dir, upload_tmp, content_type):
    response = client.post(f"{URL}?resourceId=alice", files.png(), content_type=content_type)
    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_left(attachments_dir, upload_tmp)


def test_files_that_do_not_parse_as_their_type_are_400(client, attachments_dir, upload_tmp):
    bad = {
        "truncated.png": files.png(400, 300, color=(1, 2, 3))[:-200],
        "truncated.jpg": files.jpeg(400, 300, noise=True)[:3000],
        "corrupt.pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF",
        "locked.pdf": files.pdf(pages=2, encrypt="secret"),
        "latin1.txt": "Café crème, naïve façade\n".encode("latin-1"),
        "cut-utf8.txt": "ok " .encode() + "é".encode()[:1],
    }
    for name, content in bad.items():
        response = upload(client, content, name)
        assert_error(response, 400, "invalid_attachment")
        assert_nothing_left(attachments_dir, upload_tmp)
    assert "encrypted" in upload(client, bad["locked.pdf"], "locked.pdf").json()["error"]["message"]


def test_a_decompression_bomb_is_400_and_never_decoded(client, attachments_dir, upload_tmp):
    bomb = files.png_bomb(20_000, 20_000)  # 400 megapixels
    assert len(bomb) < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = upload(client, bomb, "bomb.png")
    assert_error(response, 400, "invalid_attachment")
    assert "limit" in response.json()["error"]["message"]
    # decoded, it would be 50 MB at 1 bit a pixel and ~1.2 GB as RGB: the
    # peak RSS of this process did not move by anything like that
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 40_000  # kB
    assert_nothing_left(attachments_dir, upload_tmp)


def test_an_animation_whose_frames_are_over_the_pixel_limit_together_is_400(
        client, settings, attachments_dir, upload_tmp):
    from PIL import Image

    settings.OMNI_IMAGE_MAX_PIXELS = 100 * 100 * 5
    frames = [Image.new("RGB", (100, 100), (i * 20, 0, 0)) for i in range(8)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert_error(upload(client, out.getvalue(), "long.gif"), 400, "invalid_attachment")
    assert_nothing_left(attachments_dir, upload_tmp)


def test_a_file_over_the_limit_is_413_and_stops_midway(client, settings, attachments_dir, upload_tmp):
    """The body is under the upload's body limit (the framing's room), the
    file over the file's: the handler stops at the limit and deletes what
    it wrote."""
    settings.OMNI_ATTACHMENT_MAX_MB = 0.05
    settings.OMNI_ATTACHMENT_MAX_BYTES = int(0.05 * 1024 * 1024)
    response = upload(client, b"a" * (settings.OMNI_ATTACHMENT_MAX_BYTES + 10), "big.txt")
    assert_error(response, 413, "attachment_too_large")
    assert "0.05 MB" in response.json()["error"]["message"]
    assert_nothing_left(attachments_dir, upload_tmp)
    # a body that says it is over the whole upload's limit: refused before it is read
    body, content_type = files.multipart(b"a" * 200_000, "big.txt", {"resourceId": "alice"})
    response = client.generic("POST", URL, body, content_type=content_type)
    assert_error(response, 413, "attachment_too_large")
    assert_nothing_left(attachments_dir, upload_tmp)
    # at the limit: accepted
    assert upload(client, b"a" * settings.OMNI_ATTACHMENT_MAX_BYTES, "exact.txt").status_code == 201


def asgi_upload(body: bytes, content_type: str, chunk: int = 65536) -> tuple[int, dict]:
    """The upload through Django's ASGI handler, its body in ``chunk``-sized
    messages and no ``Content-Length`` (as daphne passes a chunked one)."""
    from django.core.asgi import get_asgi_application

    app = get_asgi_application()
    scope = {"type": "http", "method": "POST", "path": URL, "raw_path": URL.encode(), "query_string": b"",
             "headers": [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked"),
                         (b"host", b"localhost")],
             "client": ["127.0.0.1", 1], "server": ["127.0.0.1", 80], "scheme": "http",
             "http_version": "1.1", "root_path": ""}
    sent, at = [], 0

    async def receive():
        nonlocal at
        if at >= len(body):
            await asyncio.sleep(3600)  # the client waits for the answer
        at += chunk
        return {"type": "http.request", "body": body[at - chunk:at], "more_body": at < len(body)}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.mark.django_db(transaction=True)
def test_a_chunked_upload_is_read_and_a_chunked_file_over_the_limit_is_413(
        settings, attachments_dir, upload_tmp):
    content = files.pdf(pages=2)
    status, answer = asgi_upload(*files.multipart(content, "a.pdf", {"resourceId": "alice"}))
    assert status == 201 and answer["pages"] == 2, answer
    Attachment.objects.all().delete()
    for path in attachments_dir.rglob("*"):
        path.unlink() if path.is_file() else None
    settings.OMNI_ATTACHMENT_MAX_MB = 0.05
    settings.OMNI_ATTACHMENT_MAX_BYTES = int(0.05 * 1024 * 1024)
    status, answer = asgi_upload(*files.multipart(b"b" * 200_000, "big.txt", {"resourceId": "alice"}))
    assert status == 413 and answer["error"]["code"] == "attachment_too_large", answer
    assert_nothing_left(attachments_dir, upload_tmp)


def test_malformed_multipart_and_a_missing_file_are_400(client, attachments_dir, upload_tmp):
    body, content_type = files.multipart(files.png(), "a.png", {"resourceId": "alice"})
    response = client.generic("POST", URL, body[: len(body) // 2], content_type=content_type)
    assert response.status_code == 400, response.content
    response = client.post(URL, {"resourceId": "alice"})
    assert_error(response, 400, "bad_request")
    response = client.post(URL, {"other": SimpleUploadedFile("a.png", files.png()), "resourceId": "alice"})
    assert_error(response, 400, "bad_request")
    for bad in ("bad id", ""):  # an empty field is no resource, not "the caller's own"
        assert_error(upload(client, files.png(), "a.png", resource_id=bad), 400, "bad_request")
    assert_nothing_left(attachments_dir, upload_tmp)


def test_a_cross_site_upload_is_403_with_auth_off(client, attachments_dir, upload_tmp):
    response = upload(client, files.png(), "a.png", HTTP_ORIGIN="https://evil.example")
    assert_error(response, 403, "csrf_failed")
    assert_nothing_left(attachments_dir, upload_tmp)
    assert upload(client, files.png(), "a.png", HTTP_ORIGIN="http://testserver").status_code == 201


# --- what is stored -----------------------------------------------------------------

def test_each_image_type_is_accepted_with_its_size(client):
    from PIL import Image

    webp = io.BytesIO()
    Image.new("RGB", (30, 20), (9, 9, 9)).save(webp, "WEBP", quality=80)
    gif = io.BytesIO()
    Image.new("P", (25, 15)).save(gif, "GIF")
    for content, name, media_type, size in [
        (files.png(40, 30), "a.png", "image/png", (40, 30)),
        (files.jpeg(50, 35), "b.jpeg", "image/jpeg", (50, 35)),
        (gif.getvalue(), "c.gif", "image/gif", (25, 15)),
        (webp.getvalue(), "d.webp", "image/webp", (30, 20)),
        (files.png(40, 30), "named.jpg", "image/png", (40, 30)),  # the content, not the name
    ]:
        response = upload(client, content, name)
        assert response.status_code == 201, response.content
        answer = response.json()
        assert answer["mediaType"] == media_type and (answer["width"], answer["height"]) == size, answer
        assert "pages" not in answer
        data = stored(client, answer)
        assert open_image(data).size == size
        assert answer["sha256"] == hashlib.sha256(data).hexdigest() and answer["size"] == len(data)


def test_large_images_are_scaled_to_1568_on_the_longer_side(client):
    for content, name, expected in [
        (files.png(3136, 1000), "wide.png", (1568, 500)),
        (files.jpeg(1200, 4000, noise=True), "tall.jpg", (470, 1568)),
        (files.png(1568, 20), "exact.png", (1568, 20)),
    ]:
        answer = upload(client, content, name).json()
        assert (answer["width"], answer["height"]) == expected, answer
        assert open_image(stored(client, answer)).size == expected


def test_modes_every_target_takes(client):
    """CMYK JPEG, palette PNG with transparency, LA, 16-bit greyscale,
    1-bit, lossless WebP: each stored in a mode its format and the model
    take, transparency and losslessness kept."""
    from PIL import Image

    cmyk = files.jpeg(2000, 1000, mode="CMYK", color=(0, 255, 255, 0))
    answer = upload(client, cmyk, "cmyk.jpg").json()
    img = open_image(stored(client, answer))
    assert img.mode == "RGB" and img.size == (1568, 784)
    assert img.getpixel((10, 10))[0] > 200 and img.getpixel((10, 10))[1] < 60  # red stays red

    palette = Image.new("P", (2000, 100), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 1000, 100))
    out = io.BytesIO()
    palette.save(out, "PNG", transparency=0)
    img = open_image(stored(client, upload(client, out.getvalue(), "p.png").json()))
    assert img.size == (1568, 78) and img.mode == "RGBA"
    assert img.getpixel((10, 10))[3] == 0 and img.getpixel((1500, 10)) == (255, 0, 0, 255)

    small_palette = io.BytesIO()
    palette.resize((40, 2)).save(small_palette, "PNG", transparency=0)
    img = open_image(stored(client, upload(client, small_palette.getvalue(), "p2.png").json()))
    assert img.getpixel((1, 1)) in (0, (0, 0, 0, 0)) or img.convert("RGBA").getpixel((1, 1))[3] == 0

    img = open_image(stored(client, upload(client, files.png(2000, 50, mode="LA", color=(100, 128)),
                                           "la.png").json()))
    assert img.mode == "LA" and abs(img.getpixel((5, 5))[0] - 100) <= 2 and img.getpixel((5, 5))[1] == 128

    deep = Image.new("I;16", (3000, 40), 40000)
    out = io.BytesIO()
    deep.save(out, "PNG")
    img = open_image(stored(client, upload(client, out.getvalue(), "16bit.png").json()))
    assert img.size == (1568, 21) and img.mode == "L" and 150 <= img.getpixel((5, 5)) <= 160  # 40000/256

    img = open_image(stored(client, upload(client, files.png(3000, 30, mode="1", color=1), "1bit.png").json()))
    assert img.size == (1568, 16) and img.convert("L").getpixel((3, 3)) == 255

    lossless = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(lossless, "WEBP", lossless=True)
    data = stored(client, upload(client, lossless.getvalue(), "shot.webp").json())
    assert b"VP8L" in data[:40] and open_image(data).getpixel((3, 3)) == (10, 200, 30)


def exif_with_gps(orientation: int | None = None) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F] = "SpyCam Inc"  # Make
    exif[0x0131] = "LeakySoft 1.0"  # Software
    if orientation:
        exif[0x0112] = orientation
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    return exif.tobytes()


XMP = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       b"<rdf:RDF><rdf:Description>SecretXmpValue</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end='w'?>")


def test_metadata_is_stripped_from_what_is_stored(client):
    from PIL import Image, PngImagePlugin

    jpeg = files.jpeg(300, 200, exif=exif_with_gps(), comment=b"SecretComment", xmp=XMP)
    source = open_image(jpeg)
    assert source.getexif().get_ifd(0x8825) and source.info.get("comment") == b"SecretComment"
    assert b"SecretXmpValue" in jpeg
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "SecretAuthor")
    info.add_text("Location", "SecretPlace", zip=True)
    info.add_itxt("Description", "SecretItxt")
    png = files.png(300, 200, pnginfo=info, exif=exif_with_gps())
    webp = io.BytesIO()
    Image.new("RGB", (30, 20)).save(webp, "WEBP", exif=exif_with_gps(), xmp=XMP)
    gif = io.BytesIO()
    Image.new("P", (30, 20)).save(gif, "GIF", comment=b"SecretComment")
    for content, name in [(jpeg, "a.jpg"), (png, "b.png"), (webp.getvalue(), "c.webp"), (gif.getvalue(), "d.gif")]:
        data = stored(client, upload(client, content, name).json())
        for secret in (b"SpyCam", b"LeakySoft", b"Exif", b"SecretComment", b"SecretXmpValue", b"xmpmeta",
                       b"SecretAuthor", b"SecretPlace", b"SecretItxt", b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            assert secret not in data, (name, secret)
        img = open_image(data)
        assert not img.getexif() and "comment" not in img.info and "xmp" not in img.info, (name, img.info)


def test_exif_orientation_is_applied(client):
    jpeg = files.jpeg(60, 40, exif=exif_with_gps(orientation=6))  # stored sideways: turn 90 degrees
    answer = upload(client, jpeg, "sideways.jpg").json()
    assert (answer["width"], answer["height"]) == (40, 60)
    img = open_image(stored(client, answer))
    assert img.size == (40, 60) and not img.getexif()
    big = files.jpeg(3000, 2000, exif=exif_with_gps(orientation=8))
    answer = upload(client, big, "big-sideways.jpg").json()
    assert (answer["width"], answer["height"]) == (1045, 1568)


def test_an_animated_gif_stays_animated(client):
    from PIL import Image

    frames = [Image.new("RGB", (2000, 100), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    answer = upload(client, out.getvalue(), "anim.gif").json()
    assert answer["mediaType"] == "image/gif" and (answer["width"], answer["height"]) == (1568, 78)
    img = open_image(stored(client, answer))
    assert img.is_animated and img.n_frames == 3
    colours = []
    for i in range(3):
        img.seek(i)
        colours.append(img.convert("RGB").getpixel((5, 5)))
        assert img.info["duration"] == (i + 1) * 100
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_pdf_pages_and_text_types(client):
    answer = upload(client, files.pdf(pages=3), "report.pdf").json()
    assert answer["mediaType"] == "application/pdf" and answer["pages"] == 3 and "width" not in answer
    text = "# Title\n\nSome *Markdown* — with UTF-8.\n".encode()
    for name, media_type in [("notes.md", "text/markdown"), ("notes.markdown", "text/markdown"),
                             ("table.csv", "text/csv"), ("notes.txt", "text/plain"), ("README", "text/plain"),
                             ("fake.pdf", "text/plain"), ("fake.png", "text/plain")]:
        answer = upload(client, text, name).json()
        assert answer["mediaType"] == media_type, (name, answer)
        assert stored(client, answer) == text
    bom = b"\xef\xbb\xbfa,b\n1,2\n"
    assert upload(client, bom, "bom.csv").json()["mediaType"] == "text/csv"
    assert upload(client, b"a\x00b", "nul.txt").status_code == 415  # a NUL: binary


def test_the_name_is_sanitised(client):
    for sent, kept in [("../../etc/passwd.txt", "passwd.txt"), ("C:\\Users\\me\\notes.md", "notes.md"),
                       ("bad\x00\x07name\u202e.txt", "badname.txt"), ("   ", "file"),
                       ("x" * 300 + ".md", "x" * 252 + ".md")]:
        answer = upload(client, b"hello", sent).json()
        assert answer.get("name") == kept, (sent, answer)
        assert answer["mediaType"] == ("text/markdown" if kept.endswith(".md") else "text/plain")
    # no name at all is what a browser sends for an empty file input: no file
    assert_error(upload(client, b"hello", ""), 400, "bad_request")


# --- reading back -----------------------------------------------------------------

def test_download_headers_and_owner_only(client):
    image = upload(client, files.png(), "a.png").json()
    pdf = upload(client, files.pdf(), "r\u00e9port \"q\".pdf").json()
    text = upload(client, b"a,b\n", "t.csv").json()
    response = client.get(f"{URL}/{image['attachmentId']}", {"resourceId": "alice"})
    assert response["Content-Type"] == "image/png" and response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Disposition"].startswith("inline")
    response = client.get(f"{URL}/{pdf['attachmentId']}", {"resourceId": "alice"})
    assert response["Content-Type"] == "application/pdf" and response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Disposition"].startswith('attachment; filename="r_port \'q\'.pdf"')
    assert "filename*=UTF-8''r%C3%A9port%20%22q%22.pdf" in response["Content-Disposition"]
    response = client.get(f"{URL}/{text['attachmentId']}", {"resourceId": "alice"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith("attachment")
    for who in ("bob", "alice2"):
        assert_error(client.get(f"{URL}/{image['attachmentId']}", {"resourceId": who}), 404, "not_found")
    assert_error(client.get(f"{URL}/att-{'0' * 32}", {"resourceId": "alice"}), 404, "not_found")


def test_with_auth_required_401_without_credentials_and_403_for_another_resource(client, settings):
    from django.contrib.auth.models import User

    from sessions_app import tokens

    settings.OMNI_AUTH = "required"
    alice, _ = tokens.issue("alice")
    bob, _ = tokens.issue("bob")
    as_alice = {"HTTP_AUTHORIZATION": f"Bearer {alice}"}
    answer = upload(client, files.png(), "a.png", resource_id=None, **as_alice).json()
    assert answer["attachmentId"].startswith("att-")
    assert Attachment.objects.get().resource_id == "alice"
    path = f"{URL}/{answer['attachmentId']}"
    assert client.get(path, **as_alice).status_code == 200
    assert_error(client.get(path), 401, "not_authenticated")
    assert_error(upload(client, files.png(), "a.png", resource_id=None), 401, "not_authenticated")
    assert_error(client.get(path, {"resourceId": "alice"}, HTTP_AUTHORIZATION=f"Bearer {bob}"), 403, "forbidden")
    assert_error(upload(client, files.png(), "a.png", resource_id="alice", HTTP_AUTHORIZATION=f"Bearer {bob}"),
                 403, "forbidden")
    assert_error(client.get(path, HTTP_AUTHORIZATION=f"Bearer {bob}"), 404, "not_found")
    assert Attachment.objects.count() == 1 and User.objects.count() == 2


@pytest.mark.parametrize("frames", [1, 2])
def test_a_gif_frame_larger_than_its_canvas_is_held_to_the_pixel_limit(
        client, settings, attachments_dir, upload_tmp, frames):
    """Pillow grows a GIF's canvas to a frame that is larger than the
    logical screen: the frames' size is checked, not only the screen's."""
    from PIL import Image

    settings.OMNI_IMAGE_MAX_PIXELS = 50 * 50
    images = [Image.new("P", (100, 100), i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:])
    data = bytearray(out.getvalue())
    data[6:10] = (10).to_bytes(2, "little") + (10).to_bytes(2, "little")  # the screen: 10x10
    assert_error(upload(client, bytes(data), "grown.gif"), 400, "invalid_attachment")
    assert_nothing_left(attachments_dir, upload_tmp)
