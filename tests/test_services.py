"""The session service (``sessions_app.services``): save, get, delete, list, metadata."""

import base64
from datetime import timedelta

import pytest
from django.utils import timezone

from sessions_app import selectors, services
from sessions_app.errors import BadRequest, NotFound
from sessions_app.models import SessionMapping

pytestmark = pytest.mark.django_db(transaction=True)


async def make(n: int, resource: str = "alice", prefix: str = "t") -> list[SessionMapping]:
    return [
        await services.save_session(f"{prefix}{i}", resource, f"s-{prefix}{i}", user_message=f"q{i}")
        for i in range(n)
    ]


async def set_updated_at(thread_id: str, resource: str, when) -> None:
    await SessionMapping.objects.filter(thread_id=thread_id, resource_id=resource).aupdate(
        updated_at=when
    )


async def expected_order(resource: str) -> list[str]:
    """Newest first; ties broken by insertion order, newest first."""
    rows = SessionMapping.objects.filter(resource_id=resource).order_by("-updated_at", "-id")
    return [m.thread_id async for m in rows]


async def all_pages(resource: str, limit: int) -> tuple[list[str], int]:
    seen, cursor, pages = [], None, 0
    while True:
        page = await selectors.list_sessions(resource, limit, cursor)
        pages += 1
        assert len(page.sessions) <= limit
        seen += [m.thread_id for m in page.sessions]
        if page.next_cursor is None:
            return seen, pages
        assert page.sessions, "a page with a next cursor must not be empty"
        cursor = page.next_cursor
        assert pages < 100, "pagination does not terminate"


# --- save


async def test_save_creates_a_mapping_titled_by_the_first_message():
    mapping = await services.save_session(
        "t1", "alice", "s1", agent="datadog", user_message="  What   is\n2+2? "
    )
    stored = await SessionMapping.objects.aget(thread_id="t1", resource_id="alice")
    assert stored.pk == mapping.pk
    assert stored.session_id == "s1"
    assert stored.agent == "datadog"
    assert stored.title == "What is 2+2?"
    assert stored.last_message == "What is 2+2?"
    assert stored.message_count == 1
    assert stored.forked_from_thread_id is None


async def test_save_defaults_the_agent_and_records_the_fork_origin():
    await services.save_session("t2", "alice", "s2", user_message="hi", forked_from_thread_id="t1")
    stored = await SessionMapping.objects.aget(thread_id="t2", resource_id="alice")
    assert stored.agent == "smart"
    assert stored.forked_from_thread_id == "t1"


async def test_save_clips_a_long_first_message_for_the_title():
    await services.save_session("t1", "alice", "s1", user_message="word " * 100)
    stored = await SessionMapping.objects.aget(thread_id="t1")
    assert len(stored.title) == services.TITLE_CHARS
    assert stored.title.startswith("word word")
    assert len(stored.last_message) <= services.PREVIEW_CHARS


async def test_save_updates_session_preview_count_and_time_but_keeps_the_title():
    first = await services.save_session(
        "t1", "alice", "s1", user_message="first question", assistant_message="first answer"
    )
    assert first.message_count == 2
    past = timezone.now() - timedelta(hours=1)
    await SessionMapping.objects.filter(pk=first.pk).aupdate(created_at=past, updated_at=past)

    second = await services.save_session(
        "t1", "alice", "s2", user_message="second question", assistant_message="second answer"
    )
    stored = await SessionMapping.objects.aget(pk=first.pk)
    assert await SessionMapping.objects.acount() == 1
    assert second.pk == first.pk
    assert stored.session_id == "s2"
    assert stored.last_message == "second answer"
    assert stored.message_count == 4
    assert stored.title == "first question"
    assert stored.created_at == past
    assert stored.updated_at > past + timedelta(minutes=59)
    # the returned object reflects the stored row
    assert (second.session_id, second.message_count, second.updated_at) == (
        "s2", 4, stored.updated_at,
    )


async def test_save_with_only_a_user_message_counts_one():
    await services.save_session("t1", "alice", "s1", user_message="q1")
    await services.save_session("t1", "alice", "s1", user_message="q2")
    stored = await SessionMapping.objects.aget(thread_id="t1")
    assert stored.message_count == 2
    assert stored.last_message == "q2"
    assert stored.title == "q1"


async def test_save_is_scoped_by_resource():
    await services.save_session("t1", "alice", "s1", user_message="from alice")
    await services.save_session("t1", "bob", "s2", user_message="from bob")
    rows = {m.resource_id: m async for m in SessionMapping.objects.filter(thread_id="t1")}
    assert rows["alice"].session_id == "s1" and rows["alice"].title == "from alice"
    assert rows["bob"].session_id == "s2" and rows["bob"].title == "from bob"


async def test_save_logs_the_saved_mapping(chat_log):
    await services.save_session("t1", "alice", "sess-42", user_message="hi")
    lines = [r for r in chat_log.records if r.name == "omni.chat"]
    assert any(
        r.getMessage().startswith("[CHAT] Saved session mapping") and "sess-42" in r.getMessage()
        for r in lines
    ), [r.getMessage() for r in lines]


# --- get_session_id, metadata


async def test_get_session_id():
    await services.save_session("t1", "alice", "s1", user_message="hi")
    assert await selectors.get_session_id("t1", "alice") == "s1"
    assert await selectors.get_session_id("t1", "bob") is None
    assert await selectors.get_session_id("nope", "alice") is None


async def test_get_metadata():
    await services.save_session("t1", "alice", "s1", user_message="hi")
    mapping = await selectors.get_metadata("t1", "alice")
    assert (mapping.thread_id, mapping.resource_id, mapping.session_id) == ("t1", "alice", "s1")
    with pytest.raises(NotFound):
        await selectors.get_metadata("t1", "bob")
    with pytest.raises(NotFound):
        await selectors.get_metadata("nope", "alice")


# --- delete


async def test_delete_removes_only_that_mapping(chat_log):
    await services.save_session("t1", "alice", "s1", user_message="hi")
    await services.save_session("t1", "bob", "s2", user_message="hi")
    deleted = await services.delete_session("t1", "alice")
    assert deleted.session_id == "s1"
    assert await selectors.get_session_id("t1", "alice") is None
    assert await selectors.get_session_id("t1", "bob") == "s2"
    assert any(
        r.getMessage().startswith("[CHAT] Deleted session mapping") for r in chat_log.records
    )


async def test_delete_of_a_missing_thread_is_not_found():
    with pytest.raises(NotFound):
        await services.delete_session("nope", "alice")
    await services.save_session("t1", "alice", "s1", user_message="hi")
    await services.delete_session("t1", "alice")
    with pytest.raises(NotFound):
        await services.delete_session("t1", "alice")


# --- list


async def test_list_is_newest_first_and_scoped_to_the_resource():
    await make(3)
    await make(2, resource="bob")
    now = timezone.now()
    await set_updated_at("t0", "alice", now - timedelta(minutes=1))
    await set_updated_at("t1", "alice", now - timedelta(minutes=3))
    await set_updated_at("t2", "alice", now - timedelta(minutes=2))
    page = await selectors.list_sessions("alice")
    assert [m.thread_id for m in page.sessions] == ["t0", "t2", "t1"]
    assert {m.resource_id for m in page.sessions} == {"alice"}
    assert page.next_cursor is None


async def test_list_of_an_unknown_resource_is_empty():
    page = await selectors.list_sessions("nobody")
    assert page.sessions == [] and page.next_cursor is None


async def test_a_save_moves_the_thread_to_the_top():
    await make(3)
    await services.save_session("t0", "alice", "s-new", user_message="again")
    page = await selectors.list_sessions("alice")
    assert page.sessions[0].thread_id == "t0"


async def test_cursor_pagination_has_no_duplicates_or_gaps():
    await make(7)
    seen, pages = await all_pages("alice", 3)
    assert pages == 3
    assert seen == await expected_order("alice")
    assert len(set(seen)) == 7


async def test_cursor_pagination_across_identical_updated_at():
    await make(9)
    same = timezone.now().replace(microsecond=123456)
    for i in (1, 2, 3, 4, 5, 6):  # a tie that spans page boundaries
        await set_updated_at(f"t{i}", "alice", same)
    await set_updated_at("t0", "alice", same + timedelta(seconds=1))
    await set_updated_at("t7", "alice", same - timedelta(seconds=1))
    order = await expected_order("alice")
    for limit in (1, 2, 3, 4, 5, 9, 10):
        seen, _ = await all_pages("alice", limit)
        assert seen == order, f"limit={limit}"


async def test_a_page_of_exactly_limit_rows_has_no_next_cursor():
    await make(4)
    page = await selectors.list_sessions("alice", limit=4)
    assert len(page.sessions) == 4 and page.next_cursor is None
    page = await selectors.list_sessions("alice", limit=3)
    assert len(page.sessions) == 3 and page.next_cursor is not None


async def test_limit_bounds():
    await make(3)
    assert len((await selectors.list_sessions("alice", limit=1)).sessions) == 1
    assert len((await selectors.list_sessions("alice", limit=selectors.MAX_LIMIT)).sessions) == 3
    assert selectors.DEFAULT_LIMIT == 100 and selectors.MAX_LIMIT == 1000
    for bad in (0, -1, selectors.MAX_LIMIT + 1):
        with pytest.raises(BadRequest):
            await selectors.list_sessions("alice", limit=bad)


async def test_default_limit_is_100():
    await SessionMapping.objects.abulk_create(
        [SessionMapping(thread_id=f"t{i}", resource_id="alice", session_id=f"s{i}") for i in range(101)]
    )
    page = await selectors.list_sessions("alice")
    assert len(page.sessions) == 100 and page.next_cursor is not None


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!not-base64!!!",
        "garbage",
        b64("no separator"),
        b64("2025-01-01T00:00:00+00:00|not-an-int"),
        b64("not-a-date|5"),
        b64("2025-01-01T00:00:00|5"),  # naive timestamp
        base64.urlsafe_b64encode(b"\xff\xfe|1").decode(),
    ],
)
async def test_a_garbage_cursor_is_a_bad_request(cursor):
    await make(2)
    with pytest.raises(BadRequest):
        await selectors.list_sessions("alice", 1, cursor)
