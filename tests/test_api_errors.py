"""Errors Django or ninja raise before a view runs still have the contract's shape,
and session-cookie callers pass Django's CSRF check."""

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import Client

from sessions_app import services

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]


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


@pytest.mark.parametrize("query", [
    {"to": "0001-01-01"},  # the default from would be 29 days before the first day there is
    {"to": "0001-01-29"},
    {"from": "9999-12-31"},  # after today (the default to)
    {"from": "0001-01-01"},  # far more than 366 days before today
    {"from": "0001-01-01", "to": "9999-12-31"},
    {"from": "9999-12-31", "to": "0001-01-01"},
    {"from": "0000-01-01"}, {"to": "0000-12-31"}, {"to": "9999-12-32"}, {"from": "2026-02-30"},
])
def test_the_usage_range_at_the_calendars_ends_is_a_bad_request(client, query):
    assert_error(client.get("/api/usage", {"resourceId": "ida", **query}), 400, "bad_request")


@pytest.mark.parametrize("query, days", [
    ({"to": "0001-01-30"}, ("0001-01-01", "0001-01-30")),  # the default from is the first day
    ({"from": "0001-01-01", "to": "0001-01-01"}, ("0001-01-01", "0001-01-01")),
    ({"from": "9999-12-31", "to": "9999-12-31"}, ("9999-12-31", "9999-12-31")),
    ({"from": "9999-01-01", "to": "9999-12-31"}, ("9999-01-01", "9999-12-31")),
])
def test_the_usage_range_may_reach_the_calendars_ends(client, query, days):
    response = client.get("/api/usage", {"resourceId": "ida", **query})
    assert response.status_code == 200, response.content
    assert (response.json()["from"], response.json()["to"]) == days
    assert response.json()["total"]["turns"] == 0


def test_the_document_describes_what_the_server_refuses(client):
    doc = client.get("/api/openapi.json").json()
    params = {(op, p["name"]): p for op, path in (("stream", "/api/chat/stream"), ("list", "/api/sessions"),
                                                  ("usage", "/api/usage"))
              for p in doc["paths"][path]["get"]["parameters"]}
    last = params["stream", "Last-Event-ID"]
    assert last["in"] == "header" and last["schema"]["pattern"] == r"^[A-Za-z0-9]{1,64}:[0-9]{1,9}$"
    cursor = params["list", "cursor"]["schema"]
    assert any(s.get("pattern") == r"^[A-Za-z0-9_-]{1,256}$" for s in cursor.get("anyOf", [cursor]))
    assert "366 days" in params["usage", "from"]["description"]
    assert "366 days" in doc["paths"]["/api/usage"]["get"]["description"]
    for path in ("/api/chat", "/api/chat/fork"):
        assert "413" in doc["paths"][path]["post"]["responses"], path
    # a cursor outside the documented alphabet is refused as the document says
    assert_error(client.get("/api/sessions", {"resourceId": "ida", "cursor": "a b"}), 400, "bad_request")
