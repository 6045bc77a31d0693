"""Attachments in the admin (contract §11): the uploads' list (read-only,
filters, search), the staff view of their bytes, a thread's attachments with
thumbnails, and the thread's conversation with its images and documents
named, never their bytes."""

import base64
import io
import re
import uuid
import warnings

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission
from django.urls import reverse
from PIL import Image

from sessions_app.attachments import inspect, services
from sessions_app.models import Attachment
from sessions_app.transcripts import DjangoSessionStore
from tests.helpers import save

pytestmark = pytest.mark.django_db(transaction=True)

PROJECT = "-srv-omni-workspace"


def png(width, height) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=100, height=100)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def upload(tmp_path, resource, name, data) -> Attachment:
    """An upload as POST /api/attachments keeps it (inspected, then stored)."""
    path = tmp_path / uuid.uuid4().hex
    path.write_bytes(data)
    inspected = inspect.inspect(str(path), len(data), name)
    try:
        return services.store_sync(resource, inspected, name)
    finally:
        inspected.cleanup()


@pytest.fixture
def uploads(tmp_path):
    """alice's thread t-att with a message of an image, a PDF and a text
    file (and a second message of the image alone); an upload of alice's
    never sent; one of bob's."""
    image = upload(tmp_path, "alice", "red <b>dot</b>.png", png(300, 200))
    document = upload(tmp_path, "alice", "report.pdf", pdf())
    text = upload(tmp_path, "alice", "notes.md", b"# Zanzibar\nflights 900\n")
    lonely = upload(tmp_path, "alice", "never-sent.txt", b"draft\n")
    other = upload(tmp_path, "bob", "bob.png", png(40, 30))
    mapping = save("t-att", "alice", user_message="Look at these")
    services.record_use_sync("alice", "t-att", [image.pk, document.pk, text.pk])
    blocks = services.content_blocks_sync([image, document, text])
    # As a turn sends them (a marker names each upload) ...
    first = {"type": "user", "uuid": str(uuid.uuid4()),
             "message": {"role": "user", "content": services.message_content_sync(
                 [image, document, text], "Look at these")}}
    # ... and a block without its marker: found by the sha256 of its bytes.
    alone = {"type": "user", "uuid": str(uuid.uuid4()),
             "message": {"role": "user", "content": [blocks[0]]}}
    reply = {"type": "assistant", "uuid": str(uuid.uuid4()),
             "message": {"id": "msg_1", "role": "assistant", "content": [{"type": "text", "text": "Seen"}]}}
    async_to_sync(DjangoSessionStore().append)(
        {"project_key": PROJECT, "session_id": mapping.session_id}, [first, reply, alone])
    return {"image": image, "document": document, "text": text, "lonely": lonely, "other": other,
            "mapping": mapping, "blocks": blocks}


def changelist(client, **query):
    response = client.get(reverse("admin:sessions_app_attachment_changelist"), query)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def listed(page: str) -> list[str]:
    return re.findall(r'<th class="field-name"><a href="[^"]+">([^<]+)</a></th>', page)


def content(client, attachment):
    response = client.get(reverse("admin:sessions_app_attachment_content", args=[attachment.pk]))
    body = b""
    if response.status_code == 200:
        with warnings.catch_warnings():  # the async stream read by the sync test client
            warnings.simplefilter("ignore")
            body = b"".join(response)
    return response, body


def field(page: str, name: str) -> str:
    start = page.index(f"field-{name}")
    ends = [i for i in (page.find('class="form-row', start), page.find("</fieldset>", start)) if i > 0]
    return page[start:min(ends)]


def test_the_list_with_its_columns_newest_first(admin_client, uploads):
    page = changelist(admin_client)
    assert listed(page) == ["bob.png", "never-sent.txt", "notes.md", "report.pdf", "red &lt;b&gt;dot&lt;/b&gt;.png"]
    for heading in ("Name", "Media type", "Size", "Resource id", "Created at", "Sent at"):
        assert f">{heading}</a>" in page or f">{heading}</span>" in page, heading
    assert "<b>dot</b>" not in page  # escaped
    assert '<td class="field-size_display">23 B</td>' in page  # notes.md


@pytest.mark.parametrize("q, expected", [
    ("report", ["report.pdf"]), ("bob", ["bob.png"]), ("NOTES", ["notes.md"]),
])
def test_search_by_name_and_resource(admin_client, uploads, q, expected):
    assert listed(changelist(admin_client, q=q)) == expected


def test_search_by_id(admin_client, uploads):
    assert listed(changelist(admin_client, q=uploads["document"].attachment_id)) == ["report.pdf"]


def test_filters(admin_client, uploads):
    assert listed(changelist(admin_client, sent="no")) == ["bob.png", "never-sent.txt"]
    assert listed(changelist(admin_client, sent="yes")) == ["notes.md", "report.pdf",
                                                             "red &lt;b&gt;dot&lt;/b&gt;.png"]
    assert listed(changelist(admin_client, media_type="application/pdf")) == ["report.pdf"]


def test_read_only(admin_client, uploads):
    image = uploads["image"]
    assert admin_client.get(reverse("admin:sessions_app_attachment_add")).status_code == 403
    url = reverse("admin:sessions_app_attachment_change", args=[image.pk])
    page = admin_client.get(url).content.decode()
    assert 'name="name"' not in page and "Save" not in page  # a view, not a form
    assert admin_client.post(url, {"name": "renamed.png"}).status_code == 403
    assert admin_client.post(reverse("admin:sessions_app_attachment_delete", args=[image.pk]),
                             {"post": "yes"}).status_code == 403
    image.refresh_from_db()
    assert image.name == "red <b>dot</b>.png"
    # Its page: facts, the threads carrying it, a thumbnail from the staff view.
    assert "300 x 200" in page and image.sha256 in page
    thread = reverse("admin:sessions_app_sessionmapping_change", args=[uploads["mapping"].pk])
    assert f'<a href="{thread}">t-att</a>' in field(page, "threads")
    content_url = reverse("admin:sessions_app_attachment_content", args=[image.pk])
    assert f'<img src="{content_url}"' in field(page, "preview")
    lonely = admin_client.get(reverse("admin:sessions_app_attachment_change", args=[uploads["lonely"].pk]))
    assert "Not sent in any thread." in lonely.content.decode()


def test_the_staff_view_serves_the_bytes_of_any_resource(admin_client, uploads):
    for key, media_type, disposition in (("image", "image/png", "inline"),
                                         ("document", "application/pdf", "attachment"),
                                         ("text", "text/markdown; charset=utf-8", "attachment"),
                                         ("other", "image/png", "inline")):
        attachment = uploads[key]
        response, body = content(admin_client, attachment)
        assert response.status_code == 200, key
        assert body == services.read_bytes(attachment)
        assert response["Content-Type"] == media_type
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Content-Disposition"].startswith(f'{disposition}; filename="')
    missing = reverse("admin:sessions_app_attachment_content", args=[999_999])
    assert admin_client.get(missing).status_code == 404
    services.storage().delete(uploads["lonely"].storage_name)  # a row whose file is gone
    assert content(admin_client, uploads["lonely"])[0].status_code == 404


def test_the_staff_view_needs_staff_who_may_view_attachments(client, uploads, django_user_model):
    image = uploads["image"]
    url = reverse("admin:sessions_app_attachment_content", args=[image.pk])
    assert client.get(url).status_code == 302  # to the admin's login
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)
    assert client.get(url).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_attachment"))
    response, body = content(client, image)
    assert response.status_code == 200 and body.startswith(b"\x89PNG")


def test_the_thread_page_shows_its_attachments_with_thumbnails(admin_client, uploads):
    url = reverse("admin:sessions_app_sessionmapping_change", args=[uploads["mapping"].pk])
    page = admin_client.get(url).content.decode()
    part = field(page, "attachments")
    rows = re.findall(r'<tr data-attachment="([^"]+)">', part)
    assert rows == [uploads[k].attachment_id for k in ("image", "document", "text")]
    image_url = reverse("admin:sessions_app_attachment_content", args=[uploads["image"].pk])
    thumbs = re.findall(r"<img [^>]*>", part)
    assert len(thumbs) == 1 and f'src="{image_url}"' in thumbs[0]
    assert "max-width" in thumbs[0]
    for key in ("document", "text"):
        link = reverse("admin:sessions_app_attachment_content", args=[uploads[key].pk])
        assert f'<a href="{link}" download>Download</a>' in part
    assert "red &lt;b&gt;dot&lt;/b&gt;.png" in part and "<b>dot</b>" not in page
    # Never the bytes themselves.
    assert "data:" not in page and "base64" not in page
    assert uploads["blocks"][0]["source"]["data"][:200] not in page
    assert "bob.png" not in page and "never-sent.txt" not in page


def test_the_conversation_names_images_and_documents(admin_client, uploads):
    url = reverse("admin:sessions_app_sessionmapping_change", args=[uploads["mapping"].pk])
    page = admin_client.get(url).content.decode()
    conversation = field(page, "conversation")
    image, document, text = uploads["image"], uploads["document"], uploads["text"]
    blocks = re.findall(r'<span class="omni-block" data-sha256="([0-9a-f]{64})">\[([^\]]+)\] (.*?)</span>',
                        conversation)
    link = lambda a: f'<a href="{reverse("admin:sessions_app_attachment_change", args=[a.pk])}">'  # noqa: E731
    assert [(sha, label) for sha, label, _ in blocks] == [
        (image.sha256, f"image/png, {size(image.size)}"),
        (document.sha256, f"application/pdf, {size(document.size)}"),
        (text.sha256, "text/plain, 23 B"),
        (image.sha256, f"image/png, {size(image.size)}"),  # the message of the image alone
    ]
    assert [name.startswith(link(a)) for (_, _, name), a in zip(blocks, (image, document, text, image))] \
        == [True] * 4
    assert "Look at these" in conversation and "Seen" in conversation
    assert "&lt;attachment id=" not in conversation  # the markers are not the person's text
    assert base64.b64encode(services.read_bytes(document)).decode()[:100] not in page
    assert "Zanzibar" not in conversation  # a text document's content is not spilled either


def size(n: int) -> str:
    return f"{round(n / 1024)} KB" if n >= 1024 else f"{n} B"


def test_staff_who_may_not_view_attachments_do_not_see_them_on_the_thread(client, uploads, django_user_model):
    staff = django_user_model.objects.create_user("threads-only", password="pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_sessionmapping"))
    client.force_login(staff)
    page = client.get(reverse("admin:sessions_app_sessionmapping_change",
                              args=[uploads["mapping"].pk])).content.decode()
    assert "field-conversation" in page and "field-attachments" not in page
