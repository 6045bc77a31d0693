"""Attachments on the chat page (contract §11) in headless Chromium, against
a live daphne with the real SDK and CLI and the offline model: attaching by
the button, by a paste and by a drop; previews, upload progress, remove;
the errors of a refused upload; a sent message's images and files in the
conversation, full size and downloads, and after a reload.

One server for the module, with a small upload limit
(``OMNI_ATTACHMENT_MAX_MB``) so a too-big file is cheap. Browser and tabs
as in tests/test_page.py.
"""

import base64
import io
import json
import re

import pytest
from PIL import Image

from tests.e2e import new_id
from tests.test_page import (  # noqa: F401 (fixtures)
    Tab, browser, current_thread, expect, no_cli_left, open_page, serve, tabs, wait_turn_end,
)

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]

MAX_MB = "0.05"  # 52,428 bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "off", {"OMNI_ATTACHMENT_MAX_MB": MAX_MB})


def png(width: int, height: int, color=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def file(name: str, mime: str, data: bytes) -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def hand_over(page, kind: str, selector: str, name: str, mime: str, data: bytes) -> None:
    """A paste (a ClipboardEvent) or a drag and drop (dragenter, dragover,
    drop) of one file onto ``selector``, as the browser fires them."""
    page.evaluate(
        """([kind, selector, name, type, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type }));
            const target = document.querySelector(selector);
            const init = { bubbles: true, cancelable: true };
            if (kind === "paste") {
                target.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: data }));
                return;
            }
            for (const type of ["dragenter", "dragover"]) {
                target.dispatchEvent(new DragEvent(type, { ...init, dataTransfer: data }));
            }
            window.__dropping = document.querySelector("main.conversation").classList.contains("dropping");
            target.dispatchEvent(new DragEvent("drop", { ...init, dataTransfer: data }));
        }""",
        [kind, selector, name, mime, base64.b64encode(data).decode()],
    )


def tray_item(page, name: str):
    return page.locator("#attachments .attachment-item").filter(
        has=page.locator(".attachment-name", has_text=re.compile(f"^{re.escape(name)}$")))


def ready(page, name: str) -> str:
    """Waits until the tray's ``name`` is uploaded; its attachment id."""
    item = tray_item(page, name)
    expect(item).to_have_attribute("data-status", "ready")
    return item.get_attribute("data-attachment-id")


def stored(server, attachment_id: str, resource: str) -> tuple[int, bytes, dict]:
    conn = server.connection()
    conn.request("GET", f"/api/attachments/{attachment_id}?resourceId={resource}")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}


def test_attach_by_button_paste_and_drop_with_progress_remove_and_errors(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    uploads = []
    page.on("request", lambda r: uploads.append(r) if r.url.endswith("/api/attachments") else None)
    expect(page.locator("#attachments")).to_be_hidden()
    expect(page.get_by_role("button", name="Attach files (images, PDF, text)")).to_be_visible()

    # The button's picker (several files at once). The uploads are held to see them in progress.
    held = []
    page.route("**/api/attachments", lambda route: held.append(route))
    image = png(64, 48)
    page.get_by_label("Message").fill("")
    page.set_input_files("#file-input", files=[file("red.png", "image/png", image),
                                               file("notes.txt", "text/plain", b"Zanzibar trip notes\n")])
    for name in ("red.png", "notes.txt"):
        expect(tray_item(page, name).locator("progress")).to_be_visible()
        expect(tray_item(page, name).locator("progress")).to_have_attribute(
            "aria-label", f"Uploading {name}")
    expect(page.locator("#send")).to_be_disabled()  # send waits for the uploads
    expect(page.locator("#attach-status")).to_contain_text("Uploading 2 files")
    # The image's preview is drawn from the local file, before the upload ends.
    thumb = tray_item(page, "red.png").locator("img.attachment-thumb")
    expect(thumb).to_have_attribute("src", re.compile(r"^blob:"))
    assert thumb.evaluate("img => img.complete && img.naturalWidth") == 64
    while len(held) < 2:
        page.wait_for_timeout(50)
    for route in held:
        route.continue_()
    page.unroute("**/api/attachments")
    red = ready(page, "red.png")
    notes = ready(page, "notes.txt")
    assert red.startswith("att-") and notes.startswith("att-")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#attach-status")).to_have_text("")
    expect(tray_item(page, "notes.txt").locator(".attachment-meta")).to_have_text("text/plain, 20 B")
    # Uploaded as the page's resource, multipart, with the CSRF header the page's other calls send.
    status, body, _ = stored(server, red, tab.resource)
    assert status == 200 and body.startswith(b"\x89PNG")
    request = uploads[0]
    assert request.method == "POST"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.headers.get("x-csrftoken")
    assert f'name="resourceId"\r\n\r\n{tab.resource}' in request.post_data_buffer.decode("latin-1")

    # The bar follows the upload's progress events (the upload slowed down to see them).
    cdp = tab.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 16 * 1024})
    page.set_input_files("#file-input", files=[file("slow.txt", "text/plain", b"slow\n" * 8000)])
    page.wait_for_function("""() => {
        const bar = [...document.querySelectorAll("#attachments progress")]
            .find((p) => p.getAttribute("aria-label") === "Uploading slow.txt");
        return bar && bar.value > 0 && bar.value < bar.max;
    }""")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    ready(page, "slow.txt")
    page.get_by_role("button", name="Remove slow.txt").click()

    # Remove, by the keyboard: the focus stays in the tray.
    remove = page.get_by_role("button", name="Remove notes.txt")
    remove.focus()
    page.keyboard.press("Enter")
    expect(tray_item(page, "notes.txt")).to_have_count(0)
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Remove red.png"

    # A screenshot pasted into the message box.
    hand_over(page, "paste", "#message", "image.png", "image/png", png(30, 20, (0, 90, 200)))
    pasted = ready(page, "image.png")
    expect(tray_item(page, "image.png").locator("img.attachment-thumb")).to_be_visible()
    assert page.get_by_label("Message").input_value() == ""

    # A PDF dropped on the conversation (highlighted while dragged over).
    hand_over(page, "drop", "#messages", "report.pdf", "application/pdf", pdf())
    dropped = ready(page, "report.pdf")
    assert page.evaluate("window.__dropping") is True
    expect(page.locator("main.conversation")).not_to_have_class(re.compile("dropping"))
    expect(tray_item(page, "report.pdf").locator(".attachment-meta")).to_contain_text("application/pdf")
    assert len({red, pasted, dropped}) == 3

    # Refusals, each on its own file with the server's message.
    page.set_input_files("#file-input", files=[
        file("big.txt", "text/plain", b"a" * 60_000),
        file("archive.zip", "application/zip", b"PK\x03\x04" + bytes(range(256)) * 4),
        file("broken.png", "image/png", image[:40]),
    ])
    for name, kind in (("big.txt", "Too big: "), ("archive.zip", "Not a supported type: "),
                       ("broken.png", "Could not read this file: ")):
        item = tray_item(page, name)
        expect(item).to_have_attribute("data-status", "error")
        expect(item.locator(".attachment-error")).to_contain_text(kind)
        message = item.locator(".attachment-error").inner_text()[len(kind):]
        assert len(message) > 5, message  # the server's own words follow
    expect(tray_item(page, "big.txt").locator(".attachment-error")).to_contain_text("MB")
    # The good ones are still there; an error goes with its remove button.
    for name in ("red.png", "image.png", "report.pdf"):
        expect(tray_item(page, name)).to_have_attribute("data-status", "ready")
    page.get_by_role("button", name="Remove big.txt").click()
    expect(tray_item(page, "big.txt")).to_have_count(0)
    expect(page.locator("#send")).to_be_enabled()


def test_send_with_attachments_shows_them_and_after_a_reload(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    image, document, text = png(640, 480), pdf(), b"Zanzibar trip budget: flights 900\n"
    page.set_input_files("#file-input", files=[file("photo.png", "image/png", image),
                                               file("report.pdf", "application/pdf", document),
                                               file("notes.md", "text/markdown", text)])
    ids = [ready(page, name) for name in ("photo.png", "report.pdf", "notes.md")]
    box = page.get_by_label("Message")
    box.fill("What are these?")
    box.press("Enter")
    wait_turn_end(page)
    expect(page.locator("#attachments .attachment-item")).to_have_count(0)  # the tray is emptied
    sent = [json.loads(f) for f in tab.sent if '"attachments"' in f]
    assert [(f["type"], f["message"], f["attachments"]) for f in sent] == [("message", "What are these?", ids)]
    # The offline model saw them (the turn carried the content blocks).
    reply = page.locator("#messages .message.assistant").last
    expect(reply).to_contain_text("Offline model saw image/png 640x480")
    expect(reply).to_contain_text("document application/pdf, 1 page")
    thread = current_thread(page)

    def check_drawn():
        user = page.locator("#messages .message.user").first
        expect(user.locator(".text")).to_have_text("What are these?")
        img = user.locator(".message-image img")
        expect(img).to_have_count(1)
        expect(img).to_have_attribute("src", f"/api/attachments/{ids[0]}?resourceId={tab.resource}")
        expect(img).to_have_attribute("alt", "photo.png")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        chips = user.locator("a.message-file")
        expect(chips).to_have_count(2)
        expect(chips.nth(0)).to_contain_text("report.pdf")
        expect(chips.nth(1)).to_contain_text("notes.md")
        return user

    user = check_drawn()
    # A click opens the image full size (a dialog; Escape closes it).
    user.locator(".message-image").click()
    lightbox = page.locator("#lightbox")
    expect(lightbox).to_be_visible()
    page.wait_for_function("() => document.getElementById('lightbox-img').naturalWidth === 640")
    expect(page.locator("#lightbox-open")).to_have_attribute("href", re.compile(re.escape(ids[0])))
    page.keyboard.press("Escape")
    expect(lightbox).to_be_hidden()
    # The chips download the stored files.
    for index, (name, data) in enumerate((("report.pdf", document), ("notes.md", text))):
        with page.expect_download() as info:
            user.locator("a.message-file").nth(index).click()
        download = info.value
        assert download.suggested_filename == name
        assert open(download.path(), "rb").read() == data

    # After a reload, from GET /api/sessions/messages.
    page.reload()
    expect(page.locator("#messages .message")).to_have_count(2)
    assert current_thread(page) == thread
    check_drawn()

    # An upload deleted since (the listing names it with no id): a chip that says so, no link.
    def without_ids(route):
        answer = route.fetch()
        data = answer.json()
        for message in data["messages"]:
            for attachment in message.get("attachments") or ():
                if attachment["name"] == "report.pdf":
                    attachment["attachmentId"] = None
        route.fulfill(response=answer, json=data)

    page.route("**/api/sessions/messages?*", without_ids)
    page.reload()
    gone = page.locator("#messages .message.user .message-file.gone")
    expect(gone).to_have_text(re.compile(r"report\.pdf.*no longer stored"))
    assert gone.evaluate("node => node.tagName") == "SPAN"
    expect(page.locator("#messages .message.user a.message-file")).to_have_count(1)  # notes.md
    page.unroute("**/api/sessions/messages?*")

    # Attachments alone: the text may be empty; Send (the button) sends.
    page.set_input_files("#file-input", files=[file("blue.png", "image/png", png(50, 40, (0, 0, 255)))])
    only = ready(page, "blue.png")
    page.get_by_role("button", name="Send").click()
    wait_turn_end(page)
    expect(page.locator("#messages .message.user")).to_have_count(2)
    last = page.locator("#messages .message.user").last
    expect(last.locator(".message-image img")).to_have_attribute("src", re.compile(re.escape(only)))
    expect(page.locator("#messages .message.assistant").last).to_contain_text(
        "Offline model saw image/png 50x40")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    yield from serve(tmp_path_factory, "required")


def test_a_logged_in_page_uploads_sends_and_shows_its_images(auth_server, tabs):
    """``OMNI_AUTH=required`` (the default): the upload goes with the
    session cookie and the page's X-CSRFToken; the images load as the
    person's own."""
    auth_server.create_user("alice", "wonderland-123")
    tab = tabs(resource="")
    page = tab.page
    page.goto(auth_server.url())
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    page.set_input_files("#file-input", files=[file("shot.png", "image/png", png(80, 60))])
    shot = ready(page, "shot.png")
    page.get_by_role("button", name="Send").click()
    wait_turn_end(page)
    img = page.locator("#messages .message.user .message-image img")
    expect(img).to_have_attribute("src", f"/api/attachments/{shot}")
    page.wait_for_function("img => img.complete && img.naturalWidth === 80", arg=img.element_handle())
    expect(page.locator("#messages .message.assistant").last).to_contain_text(
        "Offline model saw image/png 80x60")
    page.reload()
    expect(img).to_have_attribute("src", f"/api/attachments/{shot}")
    page.wait_for_function("img => img.complete && img.naturalWidth === 80", arg=img.element_handle())
