"""The admin change page of a mapping: the stored conversation (read-only,
escaped) and, for a fork, a link to its parent's page."""

import html
import re
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse

from sessions_app import services
from sessions_app.models import SessionMapping
from sessions_app.transcripts import DjangoSessionStore
from tests.helpers import save

pytestmark = pytest.mark.django_db(transaction=True)

PROJECT = "-srv-omni-workspace"


def append(session_id, entries):
    async_to_sync(DjangoSessionStore().append)(
        {"project_key": PROJECT, "session_id": session_id}, entries)


def user(text):
    return {"type": "user", "uuid": str(uuid.uuid4()), "message": {"role": "user", "content": text}}


def assistant(message_id, text):
    return {"type": "assistant", "uuid": str(uuid.uuid4()),
            "message": {"id": message_id, "role": "assistant",
                        "content": [{"type": "text", "text": text}]}}


def change_page(admin_client, mapping) -> str:
    response = admin_client.get(
        reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk]))
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def field(page: str, name: str) -> str:
    """The rendered row of a read-only field of the change form: from its
    ``field-<name>`` row to the next row (or the end of the fieldset)."""
    start = page.index(f"field-{name}")
    ends = [i for i in (page.find('class="form-row', start), page.find("</fieldset>", start)) if i > 0]
    return page[start:min(ends)]


def test_the_conversation_is_shown(admin_client):
    mapping = save("t-conv", user_message="What is 2+2?")
    first, reply = user("What is 2+2?"), assistant("msg_1", "4")
    append(mapping.session_id, [
        first, reply,
        {**user("<system-reminder>internal</system-reminder>"), "isMeta": True},
        assistant("msg_1", "and nothing else"),
        user("What was my last question?"),
    ])
    conversation = field(change_page(admin_client, mapping), "conversation")
    texts = re.findall(r"<strong>(user|assistant)</strong>: <span[^>]*>(.*?)</span>",
                       conversation, re.DOTALL)
    assert texts == [
        ("user", "What is 2+2?"),
        ("assistant", "4\n\nand nothing else"),
        ("user", "What was my last question?"),
    ]
    assert f'data-uuid="{first["uuid"]}"' in conversation
    assert f'data-uuid="{reply["uuid"]}"' in conversation
    assert "internal" not in conversation
    assert "No stored transcript." not in conversation


def test_the_conversation_is_escaped(admin_client):
    mapping = save("t-xss")
    append(mapping.session_id, [
        user("<script>alert(1)</script>"),
        assistant("msg_x", '<img src=x onerror="alert(2)"> & <b>bold</b>'),
    ])
    page = change_page(admin_client, mapping)
    conversation = field(page, "conversation")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in conversation
    assert "<img" not in page and "<b>bold</b>" not in page
    assert html.escape('<img src=x onerror="alert(2)"> & <b>bold</b>') in conversation


def test_no_stored_transcript(admin_client):
    mapping = save("t-none", user_message="asked, never stored")
    conversation = field(change_page(admin_client, mapping), "conversation")
    assert "No stored transcript." in conversation
    assert "omni-conversation" not in conversation


def test_the_conversation_is_read_only(admin_client):
    mapping = save("t-ro", user_message="hello")
    append(mapping.session_id, [user("hello")])
    page = change_page(admin_client, mapping)
    assert 'name="conversation"' not in page
    assert 'name="session_id"' not in page and 'name="forked_from"' not in page


# --- forks ----------------------------------------------------------------------------


def test_a_fork_links_to_its_parent(admin_client):
    parent = save("t-parent")
    # a thread of the same name under another resource is not the parent
    decoy = save("t-parent", resource_id="bob")
    fork = save("t-fork", forked_from_thread_id="t-parent")
    forked_from = field(change_page(admin_client, fork), "forked_from")
    parent_url = reverse("admin:sessions_app_sessionmapping_change", args=[parent.pk])
    decoy_url = reverse("admin:sessions_app_sessionmapping_change", args=[decoy.pk])
    assert f'<a href="{parent_url}">t-parent</a>' in forked_from
    assert decoy_url not in forked_from
    assert "(deleted)" not in forked_from
    # and the link leads to the parent's own page
    assert "t-parent" in change_page(admin_client, parent)


def test_a_fork_whose_parent_is_gone(admin_client, settings, tmp_path):
    settings.CLAUDE_CONFIG_DIR = tmp_path / "claude"
    parent = save("t-gone")
    fork = save("t-orphan-fork", forked_from_thread_id="t-gone")
    async_to_sync(services.delete_session)("t-gone", "alice")
    assert not SessionMapping.objects.filter(pk=parent.pk).exists()
    forked_from = field(change_page(admin_client, fork), "forked_from")
    assert "t-gone (deleted)" in forked_from
    assert "<a " not in forked_from


def test_a_thread_that_is_not_a_fork(admin_client):
    mapping = save("t-plain")
    forked_from = field(change_page(admin_client, mapping), "forked_from")
    assert "(deleted)" not in forked_from and "<a " not in forked_from
    assert "—" in forked_from


def test_a_parent_id_with_html_is_escaped(admin_client):
    """A thread id comes from the client; it is validated on the API, but the
    admin must not trust a row written some other way."""
    fork = save("t-odd")
    SessionMapping.objects.filter(pk=fork.pk).update(forked_from_thread_id="<b>x</b>")
    page = change_page(admin_client, fork)
    assert "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt; (deleted)" in field(page, "forked_from")
