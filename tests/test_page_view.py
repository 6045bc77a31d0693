"""``GET /`` (contract §8) and the login views, through Django's clients:
what the page is given, and who may see it. The page's behaviour in a
browser is ``tests/test_page.py``."""

import json
import re

import pytest
from django.contrib.auth import get_user_model

pytestmark = pytest.mark.django_db


def page_config(response) -> dict:
    html = response.content.decode()
    match = re.search(r'<script id="omni-config" type="application/json">(.*?)</script>', html, re.S)
    assert match, html[:2000]
    return json.loads(match.group(1))


def test_the_page_with_auth_off(client, settings):
    settings.OMNI_AGENTS = {**settings.OMNI_AGENTS, "extra": {"description": "An </script> agent"}}
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    config = page_config(response)
    # The agents are the server's presets, not a list in the page.
    assert [a["name"] for a in config["agents"]] == ["smart", "datadog", "correlator", "extra"]
    assert config["agents"][-1]["description"] == "An </script> agent"
    assert config["auth"] == "off" and config["user"] is None
    assert config["defaultResourceId"] == "default-user"
    assert config["defaultAgent"] == "smart"
    assert config["loginUrl"] == "/accounts/login/" and config["wsPath"] == "/ws/chat/"
    html = response.content.decode()
    assert 'id="resource-id"' in html and "/static/chat/ui.js" in html
    assert "<script" not in html.split('type="application/json">', 1)[1].split("</script>", 1)[0]


def test_the_page_asks_to_log_in_when_auth_is_required(client, settings):
    settings.OMNI_AUTH = "required"
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"
    login = client.get(response["Location"])
    assert login.status_code == 200
    assert b'name="username"' in login.content and b'name="password"' in login.content

    get_user_model().objects.create_user("alice", password="wonderland-123")
    done = client.post("/accounts/login/", {"username": "alice", "password": "wonderland-123", "next": "/"})
    assert done.status_code == 302 and done["Location"] == "/"
    page = client.get("/")
    config = page_config(page)
    assert config["auth"] == "required" and config["user"] == "alice"
    assert config["csrfToken"]
    assert b'id="resource-id"' not in page.content
    assert b'action="/accounts/logout/"' in page.content


def test_only_get_and_head(client):
    assert client.head("/").status_code == 200
    assert client.post("/").status_code == 405


async def test_static_files_are_served_by_the_async_middleware(async_client):
    response = await async_client.get("/static/chat/api.js")
    assert response.status_code == 200
    assert "javascript" in response["Content-Type"]
    body = b"".join(response.streaming_content)
    assert b"export class ChatSocket" in body
    assert (await async_client.get("/static/chat/missing.js")).status_code == 404


@pytest.mark.engine_agnostic  # the CSRF check and the multipart body: no engine's business
@pytest.mark.django_db(transaction=True)  # the upload stores on a thread of its own
def test_a_logged_in_page_uploads_with_its_csrf_token(settings, tmp_path):
    """The page's uploads (static/chat/attachments.js) send the page's
    ``csrfToken`` as ``X-CSRFToken``, as its other calls do: with
    ``OMNI_AUTH=required`` that is what lets a session's upload through."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client

    settings.OMNI_AUTH = "required"
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(get_user_model().objects.create_user("alice", password="wonderland-123"))
    config = page_config(browser.get("/"))
    assert config["attachmentsPerMessage"] == 20
    assert config["attachmentMaxMb"] == settings.OMNI_ATTACHMENT_MAX_MB

    def upload(**headers):
        return browser.post("/api/attachments", {"file": SimpleUploadedFile("notes.txt", b"hello\n")},
                            **headers)

    refused = upload()
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    done = upload(HTTP_X_CSRFTOKEN=config["csrfToken"])
    assert done.status_code == 201, done.content
    assert done.json()["name"] == "notes.txt" and done.json()["mediaType"] == "text/plain"
