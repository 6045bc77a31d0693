"""An ``/api/`` body that is not ``application/json`` is 415 (contract §4,
issue 15 item 3), in both auth modes: a cross-site form (urlencoded,
multipart, ``text/plain``) or a ``no-cors`` fetch (no type) cannot start a
turn or touch a thread, even with ``OMNI_AUTH=off``."""

import json

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from chat_app.turns import registry
from sessions_app import services, tokens
from sessions_app.models import SessionMapping

pytestmark = [pytest.mark.django_db, pytest.mark.engine_agnostic]

CALLS = [
    ("post", "/api/chat", {"message": "hi", "threadId": "t-new", "resourceId": "alice"}),
    ("post", "/api/chat/fork", {"message": "hi", "forkFromThreadId": "t1", "threadId": "f1",
                                "resourceId": "alice"}),
    ("post", "/api/sessions/metadata", {"threadId": "t1", "resourceId": "alice"}),
    ("delete", "/api/sessions", {"threadId": "t1", "resourceId": "alice"}),
    ("post", "/api/chat/approval", {"threadId": "t1", "resourceId": "alice", "approvalId": "a1",
                                    "decision": "allow"}),
]
NOT_JSON = [
    ("text/plain", lambda body: json.dumps(body)),  # what a cross-site form can send as JSON text
    ("text/plain;charset=UTF-8", lambda body: json.dumps(body)),  # a no-cors fetch of a string
    ("application/x-www-form-urlencoded", lambda body: "&".join(f"{k}={v}" for k, v in body.items())),
    ("multipart/form-data; boundary=xyz",
     lambda body: "--xyz\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nhi\r\n--xyz--\r\n"),
    ("", lambda body: json.dumps(body)),  # no type at all (a fetch of a Blob without one)
    ("application/jsonp", lambda body: json.dumps(body)),
]


def save_thread():
    async_to_sync(services.save_session)("t1", "alice", "s-alice-t1", user_message="hi")


def send(client, method, path, content_type, data, **extra):
    if content_type:
        return getattr(client, method)(path, data, content_type=content_type, **extra)
    return client.generic(method.upper(), path, data, **extra)  # no Content-Type header


def assert_415(response):
    assert response.status_code == 415, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]


@pytest.mark.parametrize("method, path, body", CALLS)
@pytest.mark.parametrize("content_type, encode", NOT_JSON)
def test_a_body_that_is_not_json_is_415_with_auth_off(client, method, path, body, content_type, encode):
    save_thread()
    assert_415(send(client, method, path, content_type, encode(body)))
    assert registry.running() == []
    assert list(SessionMapping.objects.values_list("thread_id", flat=True)) == ["t1"]


@pytest.mark.parametrize("method, path, body", CALLS)
def test_a_body_that_is_not_json_is_415_with_auth_required(settings, method, path, body):
    settings.OMNI_AUTH = "required"
    save_thread()
    token, _ = tokens.issue("alice")
    client = Client()
    for content_type, encode in NOT_JSON:
        assert_415(send(client, method, path, content_type, encode(body),
                        HTTP_AUTHORIZATION=f"Bearer {token}"))
        assert_415(send(client, method, path, content_type, encode(body)))  # and without credentials
    assert registry.running() == []
    assert SessionMapping.objects.count() == 1


def test_json_with_a_charset_is_json(client):
    save_thread()
    response = client.post("/api/sessions/metadata", json.dumps({"threadId": "t1", "resourceId": "alice"}),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 200
    response = client.delete("/api/sessions", json.dumps({"threadId": "t1", "resourceId": "alice"}),
                             content_type="Application/JSON")
    assert response.status_code == 200


def test_no_body_at_all_is_left_to_the_view(client):
    response = client.generic("DELETE", "/api/sessions")  # no type, no body: the view's 400
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_reads_and_other_paths_are_not_concerned(client):
    assert client.get("/api/sessions", {"resourceId": "alice"}, content_type="text/plain").status_code == 200
    # a page's own login form is not /api/
    assert client.post("/accounts/login/", {"username": "x", "password": "y"}).status_code == 200


def test_openapi_documents_415_on_every_call_with_a_body(client):
    doc = client.get("/api/openapi.json").json()
    with_body = [(path, method, operation) for path, operations in doc["paths"].items()
                 for method, operation in operations.items() if "requestBody" in operation]
    assert len(with_body) >= 4
    for path, method, operation in with_body:
        for status in ("413", "415"):
            response = operation["responses"][status]
            assert response["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorOut"}, (method, path)
