"""A message for a busy thread on the chat page (contract §12) in headless
Chromium, against a live daphne with the real SDK and CLI and the offline
model: while a reply runs the composer stays open; Enter queues the message
(shown queued, with its place in line and Cancel) and it runs after, its
reply below it; Cancel takes one back; Send now (Ctrl+Enter) stops the
running reply and sends at once; after a reload the queue is read from the
server and its turns followed as they run.

One server for the module; browser and tabs as in tests/test_page.py.
"""

import json
import re

import pytest

from tests.e2e import reply
from tests.test_page import (  # noqa: F401 (fixtures)
    Tab, assistant, browser, current_thread, expect, no_cli_left, open_page, send, serve, tabs, texts,
    wait_turn_end,
)

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "off")


def queued(page):
    return page.locator("#messages .message.user.waiting")


def sent_frames(tab: Tab) -> list[dict]:
    frames = [json.loads(f) for f in tab.sent]
    return [f for f in frames if f.get("type") == "message"]


def server_queue(server, thread: str, resource: str) -> list[str]:
    status, data = server.get_json("/api/chat/queue", threadId=thread, resourceId=resource)
    assert status == 200, data
    return [q["message"] for q in data["queued"]]


def test_queue_while_busy_cancel_and_the_replies_in_order(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    first = "[pause 1] [slow] first question"  # (time to queue two and cancel one)
    send(page, first)
    expect(page.locator("#stop")).to_be_visible()
    thread = current_thread(page)
    # The composer stays open while the reply runs; Enter queues.
    expect(page.locator("#send")).to_be_enabled()
    expect(page.get_by_role("button", name="Send now")).to_be_visible()
    send(page, "second question")
    send(page, "third question")
    expect(queued(page)).to_have_count(2)
    second, third = queued(page).nth(0), queued(page).nth(1)
    expect(second.locator(".text")).to_have_text("second question")
    expect(second.locator(".queue-badge")).to_have_text("Queued: 1 in line")
    expect(third.locator(".queue-badge")).to_have_text("Queued: 2 in line")
    expect(page.locator("#messages .message.streaming")).to_have_count(1)
    assert server_queue(server, thread, tab.resource) == ["second question", "third question"]
    assert [f.get("ifBusy") for f in sent_frames(tab)] == [None, "enqueue", "enqueue"]

    # Cancel the third: gone from the page and from the server's queue.
    third.get_by_role("button", name="Cancel, take it off the queue").click()
    expect(queued(page)).to_have_count(1)
    assert server_queue(server, thread, tab.resource) == ["second question"]

    # The second runs after the first, its reply below it.
    expect(assistant(page).last.locator(".text")).to_have_text(reply("second question", first))
    wait_turn_end(page)
    expect(queued(page)).to_have_count(0)
    assert texts(page) == [
        ("user", first), ("assistant", reply(first)),
        ("user", "second question"), ("assistant", reply("second question", first)),
    ]
    expect(page.get_by_role("button", name="Send now")).to_be_hidden()


def test_send_now_interrupts_the_running_reply(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    first = "[slow] a long answer please"
    send(page, first)
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    box = page.get_by_label("Message")
    box.fill("never mind, this instead")
    box.press("Control+Enter")
    expect(page.locator("#messages .message.assistant .note").first).to_have_text("stopped")
    expect(assistant(page).last.locator(".text")).to_contain_text('Offline model heard: "never mind, this instead"')
    wait_turn_end(page)
    items = texts(page)
    assert [role for role, _ in items] == ["user", "assistant", "user", "assistant"], items
    assert items[0] == ("user", first) and items[2] == ("user", "never mind, this instead")
    assert len(items[1][1]) < len(reply(first))  # the first reply was cut short
    assert [f.get("ifBusy") for f in sent_frames(tab)] == [None, "interrupt"]

    # The Send now button does the same.
    send(page, "[slow] again a long one")
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    box.fill("stop that too")
    page.get_by_role("button", name="Send now").click()
    expect(assistant(page).last.locator(".text")).to_contain_text('Offline model heard: "stop that too"')
    wait_turn_end(page)
    assert [t for _, t in texts(page)][-2] == "stop that too"


def test_a_reload_shows_the_queue_and_follows_its_turns(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    first = "[pause 2] [slow] before the reload"
    send(page, first)
    expect(page.locator("#stop")).to_be_visible()
    send(page, "queued one")
    send(page, "queued two")
    expect(queued(page).locator(".queue-badge")).to_have_text(["Queued: 1 in line", "Queued: 2 in line"])
    page.reload()

    # Drawn from GET /api/chat/queue, with Cancel; the running reply followed.
    expect(queued(page)).to_have_count(2)
    expect(queued(page).locator(".text")).to_have_text(["queued one", "queued two"])
    expect(queued(page).locator(".queue-badge")).to_have_text(["Queued: 1 in line", "Queued: 2 in line"])
    queued(page).nth(1).get_by_role("button", name="Cancel, take it off the queue").click()
    expect(queued(page)).to_have_count(1)

    # The queued one runs next: its reply appears below it.
    expect(assistant(page).last.locator(".text")).to_have_text(reply("queued one", first))
    wait_turn_end(page)
    expect(queued(page)).to_have_count(0)
    assert texts(page) == [
        ("user", first), ("assistant", reply(first)),
        ("user", "queued one"), ("assistant", reply("queued one", first)),
    ]
