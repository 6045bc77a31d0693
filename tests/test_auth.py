"""Authentication and scoping (contract §6): API tokens (``issue_token``,
``revoke_token``, the admin), ``Authorization: Bearer`` and the session
cookie on HTTP, ``?token=`` on websockets, every call scoped to the caller's
resource; limits (blank messages, turn rate) and the OpenAPI document per
``OMNI_AUTH`` mode."""

import io
import json
from datetime import timedelta

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from chat_app import limits
from omni.asgi import application
from sessions_app import selectors, services, tokens
from sessions_app.models import ApiToken, SessionMapping
from tests import helpers
from tests.helpers import error_of

JSON = "application/json"


@pytest.fixture(autouse=True)
def auth_required(settings):
    settings.OMNI_AUTH = "required"


def issue(username, *args) -> str:
    out = io.StringIO()
    call_command("issue_token", username, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip().splitlines()[-1]


def save(thread_id, resource_id):
    return helpers.save(thread_id, resource_id, f"s-{resource_id}-{thread_id}", user_message="hi")


def bearer(token):
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def post(client, path, payload, **extra):
    return client.post(path, json.dumps(payload), content_type=JSON, **extra)


def delete(client, payload, **extra):
    return client.delete("/api/sessions", json.dumps(payload), content_type=JSON, **extra)


# --- tokens ------------------------------------------------------------------------


@pytest.mark.django_db
def test_issue_token_creates_the_user_and_stores_only_a_hash():
    token = issue("alice")
    user = get_user_model().objects.get(username="alice")
    assert not user.has_usable_password() and not user.is_staff
    row = ApiToken.objects.get(user=user)
    assert token.startswith("omni_") and len(token) > 40
    assert row.prefix == token[: tokens.PREFIX_LEN]
    assert row.token_hash == tokens.hash_token(token) and token not in row.token_hash
    assert row.expires_at is None and row.revoked_at is None and row.last_used_at is None
    # a second token for the same (existing) user; both work
    other = issue("alice", "--expires-in", "7")
    assert other != token and ApiToken.objects.filter(user=user).count() == 2
    expires = ApiToken.objects.get(prefix=other[: tokens.PREFIX_LEN]).expires_at
    assert timedelta(days=6.9) < expires - timezone.now() <= timedelta(days=7)
    assert tokens.authenticate(token) == user and tokens.authenticate(other) == user


@pytest.mark.django_db
@pytest.mark.parametrize("args", [["bad name"], ["alice", "--expires-in", "0"],
                                  ["alice", "--expires-in", "soon"]])
def test_issue_token_refuses_bad_input(args):
    with pytest.raises(CommandError):
        call_command("issue_token", *args, stdout=io.StringIO(), stderr=io.StringIO())
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_revoke_token_by_prefix_and_by_user():
    a1, a2, b1 = issue("alice"), issue("alice"), issue("bob")
    out = io.StringIO()
    call_command("revoke_token", a1[: tokens.PREFIX_LEN], stdout=out)
    assert "revoked 1" in out.getvalue()
    assert tokens.authenticate(a1) is None and tokens.authenticate(a2) is not None
    call_command("revoke_token", "--user", "alice", stdout=out)
    assert tokens.authenticate(a2) is None and tokens.authenticate(b1) is not None
    with pytest.raises(CommandError):  # nothing live left to revoke
        call_command("revoke_token", "--user", "alice", stdout=out)
    with pytest.raises(CommandError):  # too short a prefix would match too much
        call_command("revoke_token", "omni_", stdout=out)


@pytest.mark.django_db
def test_wrong_expired_revoked_or_inactive_tokens_do_not_authenticate():
    token = issue("alice")
    assert tokens.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert tokens.authenticate("") is None and tokens.authenticate("x" * 5000) is None
    row = ApiToken.objects.get()
    row.expires_at = timezone.now() - timedelta(seconds=1)
    row.save()
    assert tokens.authenticate(token) is None
    row.expires_at = None
    row.save()
    get_user_model().objects.filter(username="alice").update(is_active=False)
    assert tokens.authenticate(token) is None
    get_user_model().objects.filter(username="alice").update(is_active=True)
    assert tokens.authenticate(token) is not None
    tokens.revoke(username="alice")
    assert tokens.authenticate(token) is None


@pytest.mark.django_db
def test_last_used_is_written_at_most_once_a_minute():
    token = issue("alice")
    tokens.authenticate(token)
    first = ApiToken.objects.get().last_used_at
    assert first is not None
    tokens.authenticate(token)
    assert ApiToken.objects.get().last_used_at == first
    ApiToken.objects.update(last_used_at=first - timedelta(minutes=2))
    tokens.authenticate(token)
    assert ApiToken.objects.get().last_used_at > first


@pytest.mark.django_db
def test_the_admin_lists_and_revokes_tokens_without_the_hash(client):
    token = issue("alice")
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    page = client.get("/admin/sessions_app/apitoken/")
    assert page.status_code == 200
    html = page.content.decode()
    row = ApiToken.objects.get()
    assert row.prefix in html and "alice" in html
    assert row.token_hash not in html and token not in html
    detail = client.get(f"/admin/sessions_app/apitoken/{row.pk}/change/").content.decode()
    assert row.token_hash not in detail and row.prefix in detail
    assert client.get("/admin/sessions_app/apitoken/add/").status_code == 403
    response = client.post("/admin/sessions_app/apitoken/", {
        "action": "revoke", "_selected_action": [row.pk],
    })
    assert response.status_code == 302
    assert tokens.authenticate(token) is None


# --- HTTP ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_bearer_token_authenticates_and_scopes_every_rest_call(client):
    token = issue("alice")
    save("t1", "alice")
    save("t2", "bob")
    auth = bearer(token)
    listing = json.loads(client.get("/api/sessions", **auth).content)
    assert [s["threadId"] for s in listing["sessions"]] == ["t1"]
    assert [s["resourceId"] for s in listing["sessions"]] == ["alice"]
    assert post(client, "/api/sessions/metadata", {"threadId": "t1"}, **auth).status_code == 200
    # bob's thread is not alice's: 404 under her own resource, 403 naming bob
    error_of(post(client, "/api/sessions/metadata", {"threadId": "t2"}, **auth), 404)
    for response in (
        client.get("/api/sessions", {"resourceId": "bob"}, **auth),
        post(client, "/api/sessions/metadata", {"threadId": "t2", "resourceId": "bob"}, **auth),
        client.get("/api/sessions/messages", {"threadId": "t2", "resourceId": "bob"}, **auth),
        delete(client, {"threadId": "t2", "resourceId": "bob"}, **auth),
        post(client, "/api/chat", {"message": "hi", "threadId": "t2", "resourceId": "bob"}, **auth),
        post(client, "/api/chat/fork", {"message": "hi", "forkFromThreadId": "t2", "threadId": "f",
                                        "resourceId": "bob"}, **auth),
    ):
        assert error_of(response, 403)["code"] == "forbidden"
    # forking bob's thread into alice's resource: no such thread of hers
    error_of(post(client, "/api/chat/fork", {"message": "hi", "forkFromThreadId": "t2",
                                             "threadId": "f"}, **auth), 404)
    # a token needs no CSRF token on unsafe methods
    csrf_client = Client(enforce_csrf_checks=True)
    response = delete(csrf_client, {"threadId": "t1"}, **auth)
    assert json.loads(response.content) == {"success": True, "threadId": "t1", "resourceId": "alice"}
    assert SessionMapping.objects.filter(resource_id="bob").count() == 1


def grant_all_resources(user=None, group=None):
    """The project's cross-resource permission, to a user or a group."""
    from django.contrib.auth.models import Permission

    perm = Permission.objects.get(codename="access_all_resources", content_type__app_label="sessions_app")
    (user.user_permissions if group is None else group.permissions).add(perm)


@pytest.mark.django_db
def test_the_staff_flag_alone_opens_no_other_resource(client):
    """Staff (the admin's door) is not cross-resource access: every REST
    call naming another resource is 403 (issue 15, item 9)."""
    get_user_model().objects.create_user("ops", is_staff=True)
    token = issue("ops")
    save("t2", "bob")
    auth = bearer(token)
    for response in (
        client.get("/api/sessions", {"resourceId": "bob"}, **auth),
        post(client, "/api/sessions/metadata", {"threadId": "t2", "resourceId": "bob"}, **auth),
        client.get("/api/sessions/messages", {"threadId": "t2", "resourceId": "bob"}, **auth),
        client.get("/api/chat/stream", {"threadId": "t2", "resourceId": "bob"}, **auth),
        delete(client, {"threadId": "t2", "resourceId": "bob"}, **auth),
        post(client, "/api/chat", {"message": "hi", "threadId": "t2", "resourceId": "bob"}, **auth),
        post(client, "/api/chat/fork", {"message": "hi", "forkFromThreadId": "t2", "threadId": "f",
                                        "resourceId": "bob"}, **auth),
    ):
        assert error_of(response, 403)["code"] == "forbidden"
    assert SessionMapping.objects.filter(resource_id="bob").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["user", "group", "superuser"])
def test_the_cross_resource_permission_may_name_another_resource(client, how):
    from django.contrib.auth.models import Group

    users = get_user_model().objects
    if how == "superuser":
        users.create_superuser("ops", "ops@example.com", "pw-ops-123")
    else:
        ops = users.create_user("ops")  # not staff: the permission is what counts
        if how == "user":
            grant_all_resources(ops)
        else:
            group = Group.objects.create(name="operators")
            grant_all_resources(group=group)
            ops.groups.add(group)
    token = issue("ops")
    save("t2", "bob")
    auth = bearer(token)
    listing = json.loads(client.get("/api/sessions", {"resourceId": "bob"}, **auth).content)
    assert [s["threadId"] for s in listing["sessions"]] == ["t2"]
    assert json.loads(client.get("/api/sessions", **auth).content)["count"] == 0
    assert post(client, "/api/sessions/metadata", {"threadId": "t2", "resourceId": "bob"},
                **auth).status_code == 200
    assert delete(client, {"threadId": "t2", "resourceId": "bob"}, **auth).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("header", [
    "Bearer omni_wrong", "Bearer ", "Basic YWxpY2U6cHc=", "omni_no_scheme", "Bearer revoked",
    "Bearer expired",
])
def test_bad_credentials_are_401_even_with_a_session(client, header):
    good = issue("alice")
    if header == "Bearer revoked":
        header = f"Bearer {good}"
        tokens.revoke(username="alice")
    elif header == "Bearer expired":
        header = f"Bearer {issue('alice', '--expires-in', '0.00001')}"
        ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    client.force_login(get_user_model().objects.get(username="alice"))
    for response in (
        client.get("/api/sessions", HTTP_AUTHORIZATION=header),
        post(client, "/api/chat", {"message": "hi"}, HTTP_AUTHORIZATION=header),
        delete(client, {"threadId": "t1"}, HTTP_AUTHORIZATION=header),
    ):
        error_of(response, 401)


@pytest.mark.django_db
def test_no_credentials_is_401_on_every_call(client):
    for response in (
        client.get("/api/sessions"),
        client.get("/api/sessions/messages", {"threadId": "t1"}),
        post(client, "/api/sessions/metadata", {"threadId": "t1"}),
        delete(client, {"threadId": "t1"}),
        post(client, "/api/chat", {"message": "hi"}),
        post(client, "/api/chat/fork", {"message": "hi", "forkFromThreadId": "a", "threadId": "b"}),
    ):
        error_of(response, 401)


@pytest.mark.django_db
def test_a_session_login_must_pass_the_csrf_check_on_unsafe_methods():
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    save("t1", "alice")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/api/sessions").status_code == 200
    assert error_of(delete(client, {"threadId": "t1"}), 403)["code"] == "csrf_failed"
    client.get("/admin/login/")  # sets the csrftoken cookie
    csrf = client.cookies["csrftoken"].value
    assert delete(client, {"threadId": "t1"}, HTTP_X_CSRFTOKEN=csrf).status_code == 200


@pytest.mark.django_db
def test_with_auth_off_no_credentials_are_needed(client, settings):
    settings.OMNI_AUTH = "off"
    save("t1", "alice")
    assert json.loads(client.get("/api/sessions", {"resourceId": "alice"}).content)["count"] == 1
    error_of(client.get("/api/sessions"), 400)  # resourceId is required then


# --- limits ------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("message", ["", " ", "\n\t  \r\n", "\u00a0\u2003"])
def test_a_blank_message_is_400(client, message):
    token = issue("alice")
    for path, extra in (("/api/chat", {}), ("/api/chat/fork", {"forkFromThreadId": "a", "threadId": "b"})):
        response = post(client, path, {"message": message, **extra}, **bearer(token))
        assert "whitespace" in error_of(response, 400)["message"]


@pytest.mark.django_db
def test_over_the_turn_rate_is_429_with_retry_after(client, settings):
    settings.OMNI_TURNS_PER_MINUTE = 1
    token = issue("alice")
    limits.DatabaseBackend().admit_sync("alice", "earlier-turn")  # the resource's one turn of this minute
    response = post(client, "/api/chat", {"message": "hi"}, **bearer(token))
    assert error_of(response, 429)["code"] == "rate_limited"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert not SessionMapping.objects.exists()


# --- websockets --------------------------------------------------------------------


async def ws(path="/ws/chat/", headers=None):
    comm = WebsocketCommunicator(application, path, headers=headers or [])
    connected, code = await comm.connect()
    return comm, connected


async def frame_error(comm, frame):
    await comm.send_json_to(frame)
    event = await comm.receive_json_from(timeout=10)
    assert event["type"] == "error", event
    return event


@pytest.mark.django_db(transaction=True)
async def test_websocket_authenticates_by_token_in_the_query_or_header():
    token = await sync_issue("alice")
    for path, headers in (
        (f"/ws/chat/?token={token}", []),
        ("/ws/chat/", [(b"authorization", f"Bearer {token}".encode())]),
    ):
        comm, connected = await ws(path, headers)
        assert connected
        # authenticated as alice: bob's resource is forbidden, her own is not
        event = await frame_error(comm, {"type": "follow", "threadId": "t", "resourceId": "bob"})
        assert event["code"] == "forbidden"
        event = await frame_error(comm, {"type": "follow", "threadId": "t"})
        assert event["code"] == "not_found"
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_websocket_handshake_is_refused_without_good_credentials():
    token = await sync_issue("alice")
    from asgiref.sync import sync_to_async

    await sync_to_async(tokens.revoke)(username="alice")
    for path, headers in (
        ("/ws/chat/", []),
        ("/ws/chat/?token=omni_wrong", []),
        ("/ws/chat/?token=", []),
        (f"/ws/chat/?token={token}", []),  # revoked
        ("/ws/chat/", [(b"authorization", b"Bearer omni_wrong")]),
    ):
        comm, connected = await ws(path, headers)
        assert not connected, path
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_websocket_calls_are_scoped_to_the_callers_resource(settings):
    token = await sync_issue("alice")
    await services.save_session("t2", "bob", "s-bob-t2", user_message="hi")
    comm, connected = await ws(f"/ws/chat/?token={token}")
    assert connected
    for frame in (
        {"type": "message", "message": "hi", "threadId": "t2", "resourceId": "bob"},
        {"type": "fork", "message": "hi", "forkFromThreadId": "t2", "threadId": "f", "resourceId": "bob"},
        {"type": "interrupt", "threadId": "t2", "resourceId": "bob"},
        {"type": "follow", "threadId": "t2", "resourceId": "bob"},
    ):
        assert (await frame_error(comm, frame))["code"] == "forbidden", frame
    # bob's thread id under alice's own resource reveals nothing
    event = await frame_error(comm, {"type": "fork", "message": "hi", "forkFromThreadId": "t2",
                                     "threadId": "f"})
    assert event["code"] == "not_found"
    assert (await frame_error(comm, {"type": "interrupt", "threadId": "t2"}))["code"] == "not_found"
    # limits: a blank message, and the turn rate with retryAfter
    event = await frame_error(comm, {"type": "message", "message": "   "})
    assert event["code"] == "bad_request" and "whitespace" in event["message"]
    settings.OMNI_TURNS_PER_MINUTE = 1
    await limits.admit("alice", "earlier-turn")
    event = await frame_error(comm, {"type": "message", "message": "hi"})
    assert event["code"] == "rate_limited" and 1 <= event["retryAfter"] <= 60
    assert await SessionMapping.objects.filter(resource_id="alice").acount() == 0
    await comm.disconnect()


async def sync_issue(username):
    from asgiref.sync import sync_to_async

    raw, _ = await sync_to_async(tokens.issue)(username)
    return raw


# --- the OpenAPI document ----------------------------------------------------------


def resource_params(doc):
    """(where, required) of every resourceId a request carries."""
    found = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for param in operation.get("parameters", []):
                if param["name"] == "resourceId":
                    found.append((f"{method} {path}", param["required"]))
    for name, schema in doc["components"]["schemas"].items():
        if "resourceId" in schema.get("properties", {}) and name.endswith(("In", "Ref", "Query")):
            found.append((name, "resourceId" in schema.get("required", [])))
    return found


@pytest.mark.django_db
def test_openapi_is_true_for_the_auth_mode(client, settings):
    doc = json.loads(client.get("/api/openapi.json").content)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["BearerToken"] == {"type": "http", "scheme": "bearer",
                                      "bearerFormat": schemes["BearerToken"]["bearerFormat"]}
    assert schemes["DjangoSession"]["in"] == "cookie"
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            if path == "/api/health":  # public: a load balancer polls it
                assert "security" not in operation and "401" not in operation["responses"]
                continue
            assert {"BearerToken": []} in operation["security"], path
            assert "401" in operation["responses"], path
    found = resource_params(doc)
    assert len(found) >= 6 and not any(required for _, required in found), found

    settings.OMNI_AUTH = "off"
    doc = json.loads(client.get("/api/openapi.json").content)
    assert "securitySchemes" not in doc["components"]
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            assert "security" not in operation and "401" not in operation["responses"], path
    found = resource_params(doc)
    assert len(found) >= 6 and all(required for _, required in found), found
    chat = doc["components"]["schemas"]["ChatIn"]["properties"]
    from chat_app.schemas import NOT_BLANK

    assert chat["resourceId"]["type"] == "string"
    # the text holds a non-space character, or the message carries attachments
    assert doc["components"]["schemas"]["ChatIn"]["anyOf"] == [
        {"properties": {"message": {"pattern": NOT_BLANK.pattern}}},
        {"required": ["attachments"], "properties": {"attachments": {"minItems": 1}}}]
    assert chat["agent"]["anyOf"][0]["enum"] == sorted(settings.OMNI_AGENTS)


@pytest.mark.django_db
def test_a_database_down_is_503_json_for_chat_calls_too(client):
    """The database fails after authentication: 503 in the contract's JSON,
    nothing started."""
    from unittest import mock

    from django.db import OperationalError

    from chat_app import leases

    token = issue("alice")
    with mock.patch.object(selectors, "get_mapping", side_effect=OperationalError("refused")), \
            mock.patch.object(leases, "acquire_sync", side_effect=OperationalError("refused")):
        for path, payload in (
            ("/api/chat", {"message": "hi", "threadId": "t1"}),
            ("/api/chat/fork", {"message": "hi", "forkFromThreadId": "a", "threadId": "b"}),
        ):
            error = error_of(post(client, path, payload, **bearer(token)), 503)
            assert "refused" not in error["message"]
    from chat_app.turns import registry

    assert registry.running() == []
