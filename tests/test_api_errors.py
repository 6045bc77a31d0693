"""Errors Django or ninja raise before a view runs still have the contract's shape,
and session-cookie callers pass Django's CSRF check."""

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import Client

from sessions_app import services

pytestmark = pytest.mark.django_db(transaction=True)


def assert_error(response, status, code):
    assert response.status_code == status
    assert response.json() == {"error": {"code": code, "message": response.json()["error"]["message"]}}
    assert response.json()["error"]["message"]


def test_method_not_allowed_is_json(client):
    response = client.put("/api/sessions")
    assert_error(response, 405, "method_not_allowed")
    assert set(response["Allow"].split(", ")) == {"GET", "DELETE"}


def test_unknown_api_path_is_json(client):
    assert_error(client.get("/api/no/such/thing"), 404, "not_found")


def test_session_cookie_callers_need_a_csrf_token(settings):
    settings.OMNI_AUTH = "required"
    user = get_user_model().objects.create_user("dora", password="pw-123456789")
    async_to_sync(services.save_session)("t1", "dora", "s1", user_message="hi")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    body = {"threadId": "t1"}

    refused = client.post("/api/sessions/metadata", body, content_type="application/json")
    assert_error(refused, 403, "csrf_failed")

    client.get("/admin/login/")  # sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    accepted = client.post(
        "/api/sessions/metadata", body, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert accepted.status_code == 200
    assert accepted.json()["session"]["resourceId"] == "dora"
    # Reads need no token.
    assert client.get("/api/sessions").status_code == 200


def test_blank_means_the_same_to_the_document_and_the_server():
    """The message's documented pattern (JSON Schema, ECMAScript regexes) and
    the server's check agree: Python's \\s also counts \\x1c-\\x1f."""
    from chat_app.schemas import NOT_BLANK, not_blank

    for text in ("\x1f", "\x1c hi", "a"):
        assert not_blank(text) == text and NOT_BLANK.search(text)
    for text in (" ", "\n\t\r", "\u00a0\u2003\ufeff"):
        with pytest.raises(ValueError):
            not_blank(text)
