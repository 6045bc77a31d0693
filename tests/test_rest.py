"""REST (contract §4): ``/api/sessions``, ``/api/sessions/metadata``, the
OpenAPI document and the docs page, through Django's test client.

``/api/sessions/messages`` is covered with the transcripts."""

import json
import re
from datetime import datetime, timedelta
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.db import IntegrityError, OperationalError, connection
from django.utils import timezone

from sessions_app import selectors, services
from sessions_app.models import SessionMapping
from tests import helpers
from tests.helpers import error_of, json_of

pytestmark = pytest.mark.django_db

SESSION_KEYS = {
    "threadId", "resourceId", "sessionId", "createdAt", "updatedAt",
    "agent", "title", "lastMessage", "messageCount", "forkedFromThreadId", "costUsd", "pendingApprovalId",
}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
JSON = "application/json"


def save(thread_id, resource_id="alice", session_id=None, **kwargs) -> SessionMapping:
    """``helpers.save`` with the session id and first message this module expects."""
    kwargs.setdefault("user_message", f"question in {thread_id}")
    return helpers.save(thread_id, resource_id, session_id or f"s-{thread_id}", **kwargs)


def set_updated_at(thread_id, resource_id, when):
    SessionMapping.objects.filter(thread_id=thread_id, resource_id=resource_id).update(
        updated_at=when
    )


def assert_session(session: dict):
    assert set(session) == SESSION_KEYS, session
    for key in ("createdAt", "updatedAt"):
        assert ISO_Z.match(session[key]), session[key]
        assert datetime.fromisoformat(session[key].replace("Z", "+00:00")).tzinfo is not None
    for key in ("threadId", "resourceId", "sessionId", "agent", "title", "lastMessage"):
        assert isinstance(session[key], str), (key, session)
    assert isinstance(session["messageCount"], int)
    assert session["forkedFromThreadId"] is None or isinstance(session["forkedFromThreadId"], str)


def delete(client, payload, **extra):
    data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return client.delete("/api/sessions", data=data, content_type=JSON, **extra)


def metadata(client, payload, **extra):
    data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return client.post("/api/sessions/metadata", data=data, content_type=JSON, **extra)


def listing(client, **query):
    return client.get("/api/sessions", query)


# --- GET /api/sessions


def test_list_shape(client):
    save("t1", agent="datadog", user_message="What is 2+2?", assistant_message="4")
    save("t2", forked_from_thread_id="t1")
    response = listing(client, resourceId="alice")
    assert response.status_code == 200
    data = json_of(response)
    assert set(data) == {"sessions", "count", "nextCursor"}
    assert data["count"] == len(data["sessions"]) == 2
    assert data["nextCursor"] is None
    for session in data["sessions"]:
        assert_session(session)
    by_thread = {s["threadId"]: s for s in data["sessions"]}
    t1 = by_thread["t1"]
    assert t1 == {
        **t1,
        "resourceId": "alice",
        "sessionId": "s-t1",
        "agent": "datadog",
        "title": "What is 2+2?",
        "lastMessage": "4",
        "messageCount": 2,
        "forkedFromThreadId": None,
    }
    assert by_thread["t2"]["forkedFromThreadId"] == "t1"


def test_list_timestamps_match_the_database(client):
    mapping = save("t1")
    session = json_of(listing(client, resourceId="alice"))["sessions"][0]
    created = datetime.fromisoformat(session["createdAt"].replace("Z", "+00:00"))
    updated = datetime.fromisoformat(session["updatedAt"].replace("Z", "+00:00"))
    assert abs(created - mapping.created_at) < timedelta(milliseconds=1)
    assert abs(updated - mapping.updated_at) < timedelta(milliseconds=1)


def test_list_is_newest_first_and_scoped(client):
    for t in ("t1", "t2", "t3"):
        save(t)
    save("b1", resource_id="bob")
    now = timezone.now()
    set_updated_at("t1", "alice", now - timedelta(minutes=1))
    set_updated_at("t2", "alice", now - timedelta(minutes=5))
    set_updated_at("t3", "alice", now - timedelta(minutes=3))
    data = json_of(listing(client, resourceId="alice"))
    assert [s["threadId"] for s in data["sessions"]] == ["t1", "t3", "t2"]
    stamps = [s["updatedAt"] for s in data["sessions"]]
    assert stamps == sorted(stamps, reverse=True)
    assert {s["resourceId"] for s in data["sessions"]} == {"alice"}


def test_list_of_an_unknown_resource_is_empty(client):
    assert json_of(listing(client, resourceId="nobody")) == {
        "sessions": [], "count": 0, "nextCursor": None,
    }


def test_list_limit_default_is_100_and_max_1000(client):
    SessionMapping.objects.bulk_create(
        [SessionMapping(thread_id=f"t{i}", resource_id="alice", session_id=f"s{i}") for i in range(1001)]
    )
    data = json_of(listing(client, resourceId="alice"))
    assert data["count"] == len(data["sessions"]) == 100
    assert isinstance(data["nextCursor"], str)
    data = json_of(listing(client, resourceId="alice", limit=1000))
    assert data["count"] == len(data["sessions"]) == 1000
    assert isinstance(data["nextCursor"], str)
    data = json_of(listing(client, resourceId="alice", limit=1000, cursor=data["nextCursor"]))
    assert data["count"] == 1 and data["nextCursor"] is None


@pytest.mark.parametrize("limit", ["1001", "0", "-1", "abc", "1.5", "", "1e3"])
def test_list_limit_out_of_range_or_not_an_integer_is_400(client, limit):
    save("t1")
    error_of(client.get(f"/api/sessions?resourceId=alice&limit={limit}"), 400)


def test_list_cursor_paging_covers_every_row_once(client):
    for i in range(8):
        save(f"t{i}")
    same = timezone.now().replace(microsecond=500000)
    for i in (2, 3, 4, 5):  # a tie across a page boundary
        set_updated_at(f"t{i}", "alice", same)
    expected = [
        m.thread_id
        for m in SessionMapping.objects.filter(resource_id="alice").order_by("-updated_at", "-id")
    ]
    seen, cursor = [], None
    for _ in range(10):
        query = {"resourceId": "alice", "limit": 3}
        if cursor:
            query["cursor"] = cursor
        data = json_of(listing(client, **query))
        assert data["count"] == len(data["sessions"]) <= 3
        seen += [s["threadId"] for s in data["sessions"]]
        cursor = data["nextCursor"]
        if cursor is None:
            break
    assert seen == expected
    assert len(seen) == len(set(seen)) == 8


@pytest.mark.parametrize("cursor", ["garbage", "!!!", "MjAyNQ", "bm90LWEtZGF0ZXw1", "A" * 257, "a b", "ü"])
def test_list_garbage_cursor_is_400(client, cursor):
    save("t1")
    error_of(listing(client, resourceId="alice", cursor=cursor), 400)


# --- DELETE /api/sessions


def test_delete(client):
    save("t1")
    save("t1", resource_id="bob")
    response = delete(client, {"threadId": "t1", "resourceId": "alice"})
    assert response.status_code == 200
    assert json_of(response) == {"success": True, "threadId": "t1", "resourceId": "alice"}
    assert not SessionMapping.objects.filter(thread_id="t1", resource_id="alice").exists()
    assert SessionMapping.objects.filter(thread_id="t1", resource_id="bob").exists()
    assert json_of(listing(client, resourceId="alice"))["count"] == 0
    error_of(delete(client, {"threadId": "t1", "resourceId": "alice"}), 404)
    error_of(metadata(client, {"threadId": "t1", "resourceId": "alice"}), 404)


def test_delete_of_an_unknown_thread_is_404(client):
    error = error_of(delete(client, {"threadId": "nope", "resourceId": "alice"}), 404)
    assert error["code"]


# --- POST /api/sessions/metadata


def test_metadata(client):
    save("t1", agent="correlator", user_message="hello", assistant_message="hi there")
    response = metadata(client, {"threadId": "t1", "resourceId": "alice"})
    assert response.status_code == 200
    data = json_of(response)
    assert set(data) == {"session"}
    assert_session(data["session"])
    assert data["session"]["threadId"] == "t1"
    assert data["session"]["resourceId"] == "alice"
    assert data["session"]["sessionId"] == "s-t1"
    assert data["session"]["agent"] == "correlator"
    assert data["session"]["title"] == "hello"
    assert data["session"]["lastMessage"] == "hi there"
    assert data["session"]["messageCount"] == 2


def test_metadata_is_scoped_by_resource(client):
    save("t1")
    error_of(metadata(client, {"threadId": "t1", "resourceId": "bob"}), 404)
    error_of(metadata(client, {"threadId": "nope", "resourceId": "alice"}), 404)


# --- bad input: 400 with the error shape, never 500

BAD_BODIES = {
    "missing threadId": {"resourceId": "alice"},
    "missing resourceId (auth off)": {"threadId": "t1"},
    "empty object": {},
    "threadId a number": {"threadId": 123, "resourceId": "alice"},
    "resourceId a number": {"threadId": "t1", "resourceId": 5},
    "threadId a list": {"threadId": ["t1"], "resourceId": "alice"},
    "threadId an object": {"threadId": {"a": 1}, "resourceId": "alice"},
    "threadId null": {"threadId": None, "resourceId": "alice"},
    "threadId a bool": {"threadId": True, "resourceId": "alice"},
    "threadId with a space": {"threadId": "t 1", "resourceId": "alice"},
    "threadId with a slash": {"threadId": "t/1", "resourceId": "alice"},
    "threadId unicode": {"threadId": "tü", "resourceId": "alice"},
    "threadId 129 chars": {"threadId": "a" * 129, "resourceId": "alice"},
    "threadId empty": {"threadId": "", "resourceId": "alice"},
    "resourceId empty": {"threadId": "t1", "resourceId": ""},
    "resourceId with a space": {"threadId": "t1", "resourceId": "al ice"},
    "resourceId 129 chars": {"threadId": "t1", "resourceId": "r" * 129},
    "resourceId newline": {"threadId": "t1", "resourceId": "alice\n"},
}
RAW_BODIES = {
    "malformed JSON": "{bad",
    "truncated JSON": '{"threadId": "t1"',
    "JSON array": '[{"threadId": "t1", "resourceId": "alice"}]',
    "JSON string": '"t1"',
    "JSON number": "42",
    "JSON null": "null",
    "not UTF-8": b"\xff\xfe\x00",
    "empty body": "",
}


@pytest.fixture
def thread(db):
    save("t1")


@pytest.mark.parametrize("call", [delete, metadata], ids=["DELETE", "metadata"])
@pytest.mark.parametrize("payload", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_is_400(client, thread, call, payload):
    error_of(call(client, payload), 400)
    assert SessionMapping.objects.filter(thread_id="t1", resource_id="alice").exists()


@pytest.mark.parametrize("call", [delete, metadata], ids=["DELETE", "metadata"])
@pytest.mark.parametrize("payload", RAW_BODIES.values(), ids=RAW_BODIES.keys())
def test_unparseable_body_is_400(client, thread, call, payload):
    error_of(call(client, payload), 400)
    assert SessionMapping.objects.filter(thread_id="t1", resource_id="alice").exists()


def test_ids_at_the_limits_are_accepted(client):
    long_id = "a" * 128
    save(long_id, resource_id="R.e_s:o-u.rce9", session_id="s-long")
    response = metadata(client, {"threadId": long_id, "resourceId": "R.e_s:o-u.rce9"})
    assert response.status_code == 200
    assert json_of(response)["session"]["threadId"] == long_id
    data = json_of(listing(client, resourceId="R.e_s:o-u.rce9"))
    assert [s["threadId"] for s in data["sessions"]] == [long_id]


@pytest.mark.parametrize(
    "query",
    [
        "",  # no resourceId with OMNI_AUTH=off
        "resourceId=",
        "resourceId=al%20ice",
        "resourceId=" + "r" * 129,
        "resourceId=al/ice",
        "resourceId=%00",
        "resourceId=alice&limit=ten",
        "resourceId=alice&limit=%5B%5D",
        "resourceId=alice&limit=99999999999999999999999",
    ],
)
def test_bad_query_is_400(client, thread, query):
    error_of(client.get(f"/api/sessions?{query}"), 400)


# --- authentication (OMNI_AUTH=required)


@pytest.fixture
def auth_required(settings):
    settings.OMNI_AUTH = "required"


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def staff(db):
    """A user allowed across resources: the project's permission (the staff
    flag alone is not enough, see tests/test_auth.py)."""
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("ops", password="pw-ops-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="access_all_resources"))
    return user


def test_no_credentials_is_401(client, auth_required):
    save("t1")
    error_of(listing(client), 401)
    error_of(listing(client, resourceId="alice"), 401)
    error_of(delete(client, {"threadId": "t1"}), 401)
    error_of(delete(client, {"threadId": "t1", "resourceId": "alice"}), 401)
    error_of(metadata(client, {"threadId": "t1", "resourceId": "alice"}), 401)
    assert SessionMapping.objects.filter(thread_id="t1", resource_id="alice").exists()


def test_a_user_acts_on_its_own_resource_by_default(client, auth_required, alice):
    save("t1", resource_id="alice")
    save("t2", resource_id="bob")
    client.force_login(alice)
    data = json_of(listing(client))
    assert [s["threadId"] for s in data["sessions"]] == ["t1"]
    assert json_of(listing(client, resourceId="alice"))["count"] == 1
    response = metadata(client, {"threadId": "t1"})
    assert response.status_code == 200
    assert json_of(response)["session"]["resourceId"] == "alice"
    response = delete(client, {"threadId": "t1"})
    assert json_of(response) == {"success": True, "threadId": "t1", "resourceId": "alice"}
    assert not SessionMapping.objects.filter(resource_id="alice").exists()


def test_another_resource_is_403(client, auth_required, alice):
    save("t2", resource_id="bob")
    client.force_login(alice)
    error_of(listing(client, resourceId="bob"), 403)
    error_of(metadata(client, {"threadId": "t2", "resourceId": "bob"}), 403)
    error_of(delete(client, {"threadId": "t2", "resourceId": "bob"}), 403)
    assert SessionMapping.objects.filter(thread_id="t2", resource_id="bob").exists()


def test_staff_may_name_another_resource(client, auth_required, staff):
    save("t2", resource_id="bob")
    client.force_login(staff)
    data = json_of(listing(client, resourceId="bob"))
    assert [s["threadId"] for s in data["sessions"]] == ["t2"]
    assert json_of(listing(client))["count"] == 0  # its own resource is "ops"
    assert metadata(client, {"threadId": "t2", "resourceId": "bob"}).status_code == 200
    assert json_of(delete(client, {"threadId": "t2", "resourceId": "bob"})) == {
        "success": True, "threadId": "t2", "resourceId": "bob",
    }
    assert not SessionMapping.objects.filter(resource_id="bob").exists()


def test_an_inactive_user_is_not_authenticated(client, auth_required, alice):
    client.force_login(alice)
    alice.is_active = False
    alice.save()
    error_of(listing(client), 401)


# --- 503: the database is unreachable


@pytest.mark.parametrize(
    "module, target, request_",
    [
        ("selectors", "list_sessions", lambda c: listing(c, resourceId="alice")),
        ("services", "delete_session", lambda c: delete(c, {"threadId": "t1", "resourceId": "alice"})),
        ("selectors", "get_metadata", lambda c: metadata(c, {"threadId": "t1", "resourceId": "alice"})),
    ],
    ids=["list", "delete", "metadata"],
)
def test_database_errors_are_503(client, module, target, request_):
    with mock.patch.object(
        {"selectors": selectors, "services": services}[module], target,
        side_effect=OperationalError("could not connect to server")
    ):
        response = request_(client)
    error = error_of(response, 503)
    assert "could not connect" not in error["message"]  # no driver details to clients
    assert int(response["Retry-After"]) >= 1  # when to try again


def test_every_database_503_says_when_to_try_again(client, settings):
    settings.OMNI_BUSY_RETRY_AFTER = 7
    with mock.patch.object(selectors, "list_sessions", side_effect=IntegrityError("duplicate key")):
        response = listing(client, resourceId="alice")
    assert error_of(response, 503)["code"] == "database_error"
    assert response["Retry-After"] == "7"


def test_a_lost_database_connection_is_503(client):
    save("t1")

    def unreachable():
        raise OperationalError("connection refused")

    with mock.patch.object(connection, "ensure_connection", side_effect=unreachable):
        for response in (listing(client, resourceId="alice"),
                         metadata(client, {"threadId": "t1", "resourceId": "alice"}),
                         delete(client, {"threadId": "t1", "resourceId": "alice"})):
            assert error_of(response, 503)["code"] == "unavailable"
            assert int(response["Retry-After"]) >= 1
    assert SessionMapping.objects.filter(thread_id="t1").exists()


# --- the OpenAPI document and the docs page


def test_openapi_document(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    doc = json_of(response)
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    paths = doc["paths"]
    assert {"get", "delete"} <= set(paths["/api/sessions"])
    assert "post" in paths["/api/sessions/metadata"]
    list_params = {p["name"] for p in paths["/api/sessions"]["get"]["parameters"]}
    assert {"resourceId", "limit", "cursor"} <= list_params
    for path, operations in paths.items():
        for method, operation in operations.items():
            # 200, or 201 for the upload (contract §11)
            assert {"200", "201"} & set(operation["responses"]), (path, method)


def test_docs_page_is_served_with_local_assets(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets), assets
    assert any(a.endswith(".css") for a in assets), assets
    # nothing from a CDN
    assert not re.search(r"""(?:src|href)=["']https?://""", html), html
    for asset in assets:
        path = asset.removeprefix("/static/")
        assert finders.find(path), f"{asset} is not a local static file"
    js = next(a for a in assets if a.endswith(".js"))
    served = client.get(js)
    assert served.status_code == 200, js
    content = b"".join(served.streaming_content) if served.streaming else served.content
    assert content == open(finders.find(js.removeprefix("/static/")), "rb").read()
