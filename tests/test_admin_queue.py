"""The admin of busy threads' queues (contract §12): a thread's page shows
its queue, the queued messages' list filters and searches them, nothing
there edits or deletes a row, and "cancel" is the API's cancel."""

import re

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from chat_app.models import QueuedMessage
from chat_app.sdk import agent_preset
from chat_app.turns import TurnSpec, queued
from tests.helpers import save

pytestmark = pytest.mark.django_db

LIST = "admin:chat_app_queuedmessage_changelist"


def enqueue(thread, message, mode="enqueue", who="ann", attachments=(), resource="alice"):
    agent, preset = agent_preset(None)
    spec = TurnSpec(resource, thread, message, agent, preset, attachment_ids=list(attachments))
    return queued.insert_sync(spec, mode, who)


def rows_of(html: str, table: str) -> list[list[str]]:
    body = html[html.index(f'class="{table}"'):]
    body = body[:body.index("</table>")]
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
            for row in re.findall(r"<tr data-queue-id[^>]*>(.*?)</tr>", body, re.DOTALL)]


def test_a_threads_page_shows_its_queue_and_the_list_filters_it(admin_client):
    mapping = save("t-busy", "alice", user_message="first")
    save("t-other", "bob")
    first = enqueue("t-busy", "second <b>please</b>", who="ann", attachments=["att-1", "att-2"])
    gone = enqueue("t-busy", "never mind", who="bob")
    jumper = enqueue("t-busy", "stop, do this", mode="interrupt", who="cy")
    failed = enqueue("t-busy", "too dear")
    queued.mark_failed_sync(failed.queue_id, "budget_exceeded", "the day's budget is spent")
    queued.cancel_sync("alice", "t-busy", gone.queue_id)
    enqueue("t-other", "elsewhere", resource="bob")

    page = admin_client.get(reverse("admin:sessions_app_sessionmapping_change", args=[mapping.pk]))
    html = page.content.decode()
    waiting = rows_of(html, "omni-queue-waiting")
    # in the order they will run (an interrupt first), positions as now, text escaped
    assert [(r[0], r[1], r[2], r[3], r[5], r[6]) for r in waiting] == [
        ("1", jumper.queue_id, "interrupt", "cy", "stop, do this", "0"),
        ("2", first.queue_id, "enqueue", "ann", "second &lt;b&gt;please&lt;/b&gt;", "2"),
    ]
    ended = {r[0]: (r[1], r[6]) for r in rows_of(html, "omni-queue-ended")}
    assert ended == {failed.queue_id: ("failed", "budget_exceeded: the day&#x27;s budget is spent"),
                     gone.queue_id: ("cancelled", "cancelled")}
    assert "elsewhere" not in html
    empty = admin_client.get(reverse("admin:sessions_app_sessionmapping_change",
                                     args=[save("t-idle", "alice").pk])).content.decode()
    assert "No queued messages." in empty

    def listed(**query):
        response = admin_client.get(reverse(LIST), query)
        assert response.status_code == 200
        return sorted(r.message for r in response.context["cl"].result_list)

    assert listed(state="waiting") == ["elsewhere", "second <b>please</b>", "stop, do this"]
    assert listed(mode="interrupt") == ["stop, do this"]
    assert listed(q="t-other") == ["elsewhere"]
    assert listed(q=failed.queue_id) == ["too dear"]
    # read-only: no add, no edit, no delete
    change = reverse("admin:chat_app_queuedmessage_change", args=[first.pk])
    assert admin_client.get(change).status_code == 200
    admin_client.post(change, {"message": "edited", "state": "started"})
    assert QueuedMessage.objects.get(pk=first.pk).message == "second <b>please</b>"
    assert admin_client.get(reverse("admin:chat_app_queuedmessage_add")).status_code == 403
    assert admin_client.post(reverse("admin:chat_app_queuedmessage_delete", args=[first.pk]),
                             {"post": "yes"}).status_code == 403
    assert "delete_selected" not in admin_client.get(reverse(LIST)).content.decode()


def test_cancel_goes_through_the_queue_and_needs_the_change_permission(admin_client, monkeypatch):
    from chat_app import queue

    save("t-cancel", "alice")
    waiting, started = enqueue("t-cancel", "a"), enqueue("t-cancel", "b")
    queued.mark_starting_sync(started)
    calls = []
    real = queue.cancel

    async def spy(*args):
        calls.append(args)
        return await real(*args)

    monkeypatch.setattr(queue, "cancel", spy)
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_queuedmessage"))
    client = Client()
    client.force_login(viewer)
    action = {"action": "cancel", "_selected_action": [waiting.pk, started.pk]}
    assert "Cancel the selected" not in client.get(reverse(LIST)).content.decode()
    client.post(reverse(LIST), action)
    assert calls == [] and QueuedMessage.objects.get(pk=waiting.pk).state == "waiting"

    response = admin_client.post(reverse(LIST), action, follow=True)
    assert sorted(calls) == sorted([("alice", "t-cancel", waiting.queue_id), ("alice", "t-cancel", started.queue_id)])
    assert QueuedMessage.objects.get(pk=waiting.pk).state == "cancelled"
    assert QueuedMessage.objects.get(pk=started.pk).state == "starting"  # not the admin's to stop
    assert "Cancelled 1 queued message(s). 1 had started or ended already." in response.content.decode()
