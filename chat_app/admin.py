"""The admin of busy threads' queues (contract §12): read-only.

A queued message is written by the queue only (:mod:`chat_app.queue`); here
it is looked at, on its own list (:class:`QueuedMessageAdmin`) and on its
thread's page (:func:`thread_queue`, a field of the thread's admin in
:mod:`sessions_app.admin`). The one change: staff who may change queued
messages can cancel waiting ones, through :func:`chat_app.queue.cancel`
(the API's cancel: the message's stream ends with ``error`` ``cancelled``,
the page's queue on every socket is told).
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import OuterRef, Subquery
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from sessions_app.errors import NotFound
from sessions_app import selectors
from sessions_app.admin import THREAD_PARTS

from .models import QueuedMessage

PREVIEW_CHARS = 200
# The thread's page shows the latest ended rows (kept chat_app.queue.KEEP_ENDED_SECONDS).
THREAD_ENDED_SHOWN = 20


def _when(value) -> str:
    from sessions_app.admin import _when as when

    return when(value)


def _row_link(row: QueuedMessage) -> str:
    return format_html('<a href="{}">{}</a>', reverse("admin:chat_app_queuedmessage_change", args=[row.pk]),
                       row.queue_id)


def _list_url(**lookups) -> str:
    from urllib.parse import urlencode

    return reverse("admin:chat_app_queuedmessage_changelist") + "?" + urlencode(lookups)


def thread_queue(resource_id: str, thread_id: str) -> str:
    """A thread's queue as HTML: the messages waiting, in the order they
    will run (their position now, who sent them, when, the text, how many
    attachments), then the latest that ended or are starting (their state
    and error)."""
    rows = QueuedMessage.objects.filter(resource_id=resource_id, thread_id=thread_id)
    waiting = list(rows.filter(state=QueuedMessage.WAITING).order_by("priority", "id"))
    others = list(rows.exclude(state=QueuedMessage.WAITING).order_by("-id")[:THREAD_ENDED_SHOWN])
    if not waiting and not others:
        return "No queued messages."
    parts = []
    if waiting:
        parts.append(format_html(
            '<table class="omni-queue-waiting"><thead><tr><th>Position</th><th>Queue id</th><th>Mode</th>'
            "<th>Who</th><th>Queued at</th><th>Message</th><th>Attachments</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join(
                "",
                '<tr data-queue-id="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
                '<td><span style="white-space: pre-wrap">{}</span></td><td>{}</td></tr>',
                ((r.queue_id, n, _row_link(r), r.mode, r.created_by or "—", _when(r.created_at),
                  Truncator(r.message).chars(PREVIEW_CHARS), len(r.attachment_ids or ()))
                 for n, r in enumerate(waiting, 1)),
            )))
    else:
        parts.append(format_html("<p>{}</p>", "No message waits."))
    if others:
        parts.append(format_html(
            '<p>Recently started or ended (the latest {}): <a href="{}">all of this thread\'s</a></p>'
            '<table class="omni-queue-ended"><thead><tr><th>Queue id</th><th>State</th><th>Mode</th>'
            "<th>Who</th><th>Queued at</th><th>Ended at</th><th>Error</th><th>Message</th>"
            "<th>Attachments</th></tr></thead><tbody>{}</tbody></table>",
            THREAD_ENDED_SHOWN, _list_url(resource_id=resource_id, thread_id=thread_id),
            format_html_join(
                "",
                '<tr data-queue-id="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
                '<td>{}</td><td><span style="white-space: pre-wrap">{}</span></td><td>{}</td></tr>',
                ((r.queue_id, _row_link(r), r.state, r.mode, r.created_by or "—", _when(r.created_at),
                  _when(r.ended_at), _error(r), Truncator(r.message).chars(PREVIEW_CHARS),
                  len(r.attachment_ids or ())) for r in others),
            )))
    return format_html_join("", "{}", ((p,) for p in parts))


def _error(row: QueuedMessage) -> str:
    if not row.error_code:
        return "—"
    if not row.error_message or row.error_code == "cancelled":
        return row.error_code
    return f"{row.error_code}: {row.error_message}"


@admin.register(QueuedMessage)
class QueuedMessageAdmin(admin.ModelAdmin):
    """Queued messages: written by the queue only, so read-only here; gone
    with their thread or a while after they ended. "Cancel" (staff who may
    change queued messages) goes through the API's cancel."""

    list_display = ("queue_id", "thread", "resource_id", "state", "mode", "position", "created_by",
                    "created_at", "attachments", "preview")
    list_filter = ("state", "mode")
    search_fields = ("thread_id", "resource_id", "queue_id")
    ordering = ("-id",)
    list_per_page = 100
    fields = ("queue_id", "thread", "resource_id", "turn_id", "state", "mode", "position", "created_by",
              "created_at", "started_at", "ended_at", "error_code", "error_message", "agent", "message",
              "attachment_ids")
    readonly_fields = fields
    actions = ["cancel"]

    def has_add_permission(self, request):
        return False  # queued by chat requests (ifBusy)

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # cancel instead: the stream must learn it

    def has_cancel_permission(self, request):
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.action(description="Cancel the selected waiting messages", permissions=["cancel"])
    def cancel(self, request, queryset):
        from . import queue

        cancelled = skipped = 0
        for resource_id, thread_id, queue_id in queryset.values_list("resource_id", "thread_id", "queue_id"):
            try:
                async_to_sync(queue.cancel)(resource_id, thread_id, queue_id)
                cancelled += 1
            except NotFound:  # started, ended, or gone meanwhile
                skipped += 1
        self.message_user(request, f"Cancelled {cancelled} queued message(s)."
                          + (f" {skipped} had started or ended already." if skipped else ""),
                          messages.SUCCESS if cancelled else messages.WARNING)

    def get_queryset(self, request):
        mapping = selectors.mapping_of(OuterRef("resource_id"), OuterRef("thread_id")).values("pk")[:1]
        return super().get_queryset(request).annotate(mapping_pk=Subquery(mapping))

    @admin.display(description="Thread", ordering="thread_id")
    def thread(self, obj):
        if obj.mapping_pk is None:
            return obj.thread_id  # its first turn has not stored the mapping yet
        url = reverse("admin:sessions_app_sessionmapping_change", args=[obj.mapping_pk])
        return format_html('<a href="{}">{}</a>', url, obj.thread_id)

    @admin.display(description="Attachments")
    def attachments(self, obj):
        return len(obj.attachment_ids or ())

    @admin.display(description="Message")
    def preview(self, obj):
        return Truncator(obj.message).chars(80)


THREAD_PARTS["queue"] = (QueuedMessage, thread_queue)  # on a thread's page (sessions_app.admin)
