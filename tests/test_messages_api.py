"""``GET /api/sessions/messages?threadId=T&resourceId=R`` (contract §4): the
conversation so far, read from the transcript rows in the database, for a page
that reloads."""

import json
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model

from sessions_app.transcripts import DjangoSessionStore
from tests import helpers
from tests.helpers import error_of

pytestmark = pytest.mark.django_db(transaction=True)

JSON = "application/json"
PATH = "/api/sessions/messages"
PROJECT = "-srv-omni-workspace"


def new_uuid() -> str:
    return str(uuid.uuid4())


def save(thread_id, resource_id="alice", session_id=None):
    return helpers.save(thread_id, resource_id, session_id, user_message="What is 2+2?")


def append(session_id, entries, project_key=PROJECT, **key):
    async_to_sync(DjangoSessionStore().append)(
        {"project_key": project_key, "session_id": session_id, **key}, entries)


def user(text, uuid_=None, **fields):
    return {"type": "user", "uuid": uuid_ or new_uuid(), "isSidechain": False,
            "userType": "external", "message": {"role": "user", "content": text}, **fields}


def assistant(message_id, *blocks, uuid_=None, **fields):
    return {"type": "assistant", "uuid": uuid_ or new_uuid(), "isSidechain": False,
            "message": {"id": message_id, "type": "message", "role": "assistant",
                        "model": "claude-sonnet-4-5", "content": list(blocks),
                        "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 1}},
            **fields}


def text(value):
    return {"type": "text", "text": value}


def get(client, **query):
    return client.get(PATH, query)


def ok(response) -> dict:
    assert response.status_code == 200, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith(JSON)
    data = json.loads(response.content)
    assert set(data) == {"threadId", "sessionId", "messages"}, data
    for message in data["messages"]:
        assert set(message) == {"role", "text", "uuid"}, message
        assert message["role"] in ("user", "assistant")
        assert isinstance(message["text"], str) and message["text"]
        assert isinstance(message["uuid"], str) and message["uuid"]
    return data


@pytest.fixture
def conversation():
    """A CLI-like transcript: a question, a reply written as two entries of one
    message, a reminder the CLI injects, a tool round trip, a second question."""
    sid = new_uuid()
    save("t1", "alice", sid)
    ids = {name: new_uuid() for name in ("q1", "a1", "a1b", "reminder", "tool", "q2", "a2")}
    append(sid, [
        {"type": "queue-operation", "operation": "enqueue", "sessionId": sid},
        user("What is 2+2?", ids["q1"]),
        assistant("msg_1", text("4"), uuid_=ids["a1"], parentUuid=ids["q1"]),
        # the CLI's meta entry: never shown as the person's words
        user("<system-reminder>\nThe date changed.\n</system-reminder>", ids["reminder"], isMeta=True),
        # the same reply (message id msg_1) goes on in a second entry: one message
        assistant("msg_1", text("Anything else?"), uuid_=ids["a1b"], parentUuid=ids["a1"]),
        {"type": "user", "uuid": ids["tool"], "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}},
        user("What was my last question?", ids["q2"]),
        assistant("msg_2", text('Earlier questions: "What is 2+2?"'), uuid_=ids["a2"]),
        {"type": "summary", "summary": "Arithmetic", "leafUuid": ids["a2"]},
    ])
    return sid, ids


def test_messages_of_a_thread(client, conversation):
    sid, ids = conversation
    data = ok(get(client, threadId="t1", resourceId="alice"))
    assert data["threadId"] == "t1" and data["sessionId"] == sid
    assert data["messages"] == [
        {"role": "user", "text": "What is 2+2?", "uuid": ids["q1"]},
        {"role": "assistant", "text": "4\n\nAnything else?", "uuid": ids["a1"]},
        {"role": "user", "text": "What was my last question?", "uuid": ids["q2"]},
        {"role": "assistant", "text": 'Earlier questions: "What is 2+2?"', "uuid": ids["a2"]},
    ]
    assert "system-reminder" not in json.dumps(data)


def test_a_reminder_without_is_meta_is_hidden_too(client):
    sid = new_uuid()
    save("t-rem", "alice", sid)
    q = new_uuid()
    append(sid, [
        user("<system-reminder>Be brief.</system-reminder>"),
        user([text("<system-reminder>Be brief.</system-reminder>"), text("Hi there")], q),
    ])
    messages = ok(get(client, threadId="t-rem", resourceId="alice"))["messages"]
    assert messages == [{"role": "user", "text": "Hi there", "uuid": q}]


def test_subagent_lines_are_not_the_conversation(client):
    sid = new_uuid()
    save("t-sub", "alice", sid)
    q = new_uuid()
    append(sid, [user("Main question", q)])
    append(sid, [user("subagent prompt", isSidechain=True),
                 assistant("msg_sub", text("subagent answer"), isSidechain=True)],
           subpath="subagents/agent-1")
    messages = ok(get(client, threadId="t-sub", resourceId="alice"))["messages"]
    assert messages == [{"role": "user", "text": "Main question", "uuid": q}]


def test_messages_are_read_under_any_project_key(client):
    """A session written on another machine (another working directory)."""
    sid = new_uuid()
    save("t-away", "alice", sid)
    q = new_uuid()
    append(sid, [user("Asked elsewhere", q)], project_key="-home-someone-else")
    assert ok(get(client, threadId="t-away", resourceId="alice"))["messages"] == [
        {"role": "user", "text": "Asked elsewhere", "uuid": q}]


def test_a_thread_with_no_stored_transcript_has_no_messages(client):
    mapping = save("t-empty")
    data = ok(get(client, threadId="t-empty", resourceId="alice"))
    assert data == {"threadId": "t-empty", "sessionId": mapping.session_id, "messages": []}


def test_threads_are_separate(client, conversation):
    other = new_uuid()
    save("t2", "alice", other)
    q = new_uuid()
    append(other, [user("Unrelated", q)])
    assert ok(get(client, threadId="t2", resourceId="alice"))["messages"] == [
        {"role": "user", "text": "Unrelated", "uuid": q}]
    assert len(ok(get(client, threadId="t1", resourceId="alice"))["messages"]) == 4


def test_unknown_thread_is_404(client, conversation):
    assert error_of(get(client, threadId="nope", resourceId="alice"), 404)["code"] == "not_found"
    # the thread exists, but for another resource
    assert error_of(get(client, threadId="t1", resourceId="bob"), 404)["code"] == "not_found"


@pytest.mark.parametrize("query", [
    {"resourceId": "alice"},
    {"threadId": "", "resourceId": "alice"},
    {"threadId": "bad id", "resourceId": "alice"},
    {"threadId": "t1/../x", "resourceId": "alice"},
    {"threadId": "t" * 129, "resourceId": "alice"},
    {"threadId": "t1", "resourceId": "bad id"},
    {"threadId": "t1", "resourceId": ""},
    {"threadId": "t1"},  # OMNI_AUTH=off: resourceId is required
], ids=["no-thread", "empty-thread", "space", "slash", "too-long", "bad-resource",
        "empty-resource", "no-resource"])
def test_bad_query_is_400(client, conversation, query):
    assert error_of(get(client, **query), 400)["code"] == "bad_request"


def test_ids_at_the_limits_are_accepted(client):
    thread, resource = "T._:-" + "x" * 123, "R._:-" + "y" * 123
    save(thread, resource)
    data = ok(get(client, threadId=thread, resourceId=resource))
    assert data["threadId"] == thread and data["messages"] == []


def test_other_methods_are_405(client, conversation):
    response = client.post(PATH, data="{}", content_type=JSON)
    assert error_of(response, 405)


# --- OMNI_AUTH=required -------------------------------------------------------------


@pytest.fixture
def auth_required(settings):
    settings.OMNI_AUTH = "required"


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


def test_anonymous_is_401(client, auth_required, conversation):
    assert error_of(get(client, threadId="t1", resourceId="alice"), 401)["code"] == "not_authenticated"
    assert error_of(get(client, threadId="t1"), 401)


def test_a_user_reads_its_own_thread(client, auth_required, alice, conversation):
    client.force_login(alice)
    own = ok(get(client, threadId="t1"))  # resourceId omitted: the caller's own
    assert len(own["messages"]) == 4
    assert ok(get(client, threadId="t1", resourceId="alice")) == own


def test_another_resource_is_403(client, auth_required, alice):
    sid = new_uuid()
    save("t-bob", "bob", sid)
    append(sid, [user("Bob's secret")])
    client.force_login(alice)
    error = error_of(get(client, threadId="t-bob", resourceId="bob"), 403)
    assert "secret" not in error["message"]
    # and alice's own resource has no such thread
    assert error_of(get(client, threadId="t-bob"), 404)


# --- the OpenAPI document -----------------------------------------------------------


def test_the_path_is_in_the_openapi_document(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    doc = json.loads(response.content)
    operation = doc["paths"][PATH]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert {"threadId", "resourceId"} <= set(params)
    assert params["threadId"]["required"] is True
    assert {"200", "400", "404"} <= set(operation["responses"])
