import json

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.urls import reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from . import services, transcripts
from .errors import NotFound
from .models import ApiToken, SessionMapping, ToolCall

# The thread's page shows its latest calls; the audit list has them all.
THREAD_CALLS_SHOWN = 100
PREVIEW_CHARS = 200


def _when(value) -> str:
    """A datetime as the admin shows it (in the current time zone), or a dash."""
    if value is None:
        return "—"
    return formats.localize(timezone.template_localtime(value))


def _duration(ms) -> str:
    return "—" if ms is None else f"{ms} ms"


def _pretty_json(text: str) -> str:
    """A call's stored input, indented; as stored if it is not JSON."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return text


def _thread_link(mapping_id, thread_id):
    url = reverse("admin:sessions_app_sessionmapping_change", args=[mapping_id])
    return format_html('<a href="{}">{}</a>', url, thread_id)


def _calls_list_url(mapping_id) -> str:
    return reverse("admin:sessions_app_toolcall_changelist") + f"?mapping__id__exact={mapping_id}"


@admin.register(SessionMapping)
class SessionMappingAdmin(admin.ModelAdmin):
    list_display = (
        "thread_id", "resource_id", "session_id", "agent", "title", "message_count", "updated_at",
    )
    list_filter = ("agent",)
    search_fields = ("thread_id", "resource_id", "session_id", "title")
    ordering = ("-updated_at", "-id")
    readonly_fields = (
        "thread_id", "resource_id", "session_id", "created_at", "updated_at",
        "forked_from", "message_count", "conversation", "tool_calls",
    )
    fields = readonly_fields[:3] + ("agent", "title", "last_message") + readonly_fields[3:]
    list_per_page = 50

    def has_add_permission(self, request):
        return False  # mappings are made by chat turns

    @admin.display(description="Forked from")
    def forked_from(self, obj):
        if not obj.forked_from_thread_id:
            return "—"
        parent = SessionMapping.objects.filter(
            thread_id=obj.forked_from_thread_id, resource_id=obj.resource_id
        ).first()
        if parent is None:
            return f"{obj.forked_from_thread_id} (deleted)"
        url = reverse("admin:sessions_app_sessionmapping_change", args=[parent.pk])
        return format_html('<a href="{}">{}</a>', url, parent.thread_id)

    @admin.display(description="Conversation")
    def conversation(self, obj):
        """The transcript from the database, read-only."""
        messages = transcripts.transcript_messages(transcripts.main_transcript(obj.session_id))
        if not messages:
            return "No stored transcript."
        return format_html(
            '<div class="omni-conversation">{}</div>',
            format_html_join(
                "",
                '<p data-uuid="{}"><strong>{}</strong>: <span style="white-space: pre-wrap">{}</span></p>',
                ((m["uuid"], m["role"], m["text"]) for m in messages),
            ),
        )

    @admin.display(description="Tool calls")
    def tool_calls(self, obj):
        """The thread's tool calls and the decisions on them (the audit), newest
        last, read-only; each links to its own page."""
        calls = list(
            ToolCall.objects.filter(mapping=obj).order_by("-created_at", "-id")[:THREAD_CALLS_SHOWN + 1]
        )
        if not calls:
            return "No tool calls."
        more = ""
        if len(calls) > THREAD_CALLS_SHOWN:
            calls = calls[:THREAD_CALLS_SHOWN]
            more = format_html(
                '<p>Only the latest {} are shown: <a href="{}">all of this thread\'s calls</a>.</p>',
                THREAD_CALLS_SHOWN, _calls_list_url(obj.pk),
            )
        calls.reverse()
        rows = format_html_join(
            "",
            '<tr data-tool-call="{}"><td>{}</td><td><a href="{}">{}</a></td>'
            '<td><code style="white-space: pre-wrap">{}</code></td><td>{}</td><td>{}</td>'
            '<td>{}</td><td>{}</td><td>{}</td>'
            '<td><span style="white-space: pre-wrap">{}</span></td></tr>',
            (
                (
                    c.pk, _when(c.created_at),
                    reverse("admin:sessions_app_toolcall_change", args=[c.pk]), c.tool,
                    Truncator(c.input).chars(PREVIEW_CHARS), c.status, c.decision or "—",
                    c.decided_by or "—", _when(c.decided_at), _duration(c.duration_ms),
                    Truncator(c.result).chars(PREVIEW_CHARS) or "—",
                )
                for c in calls
            ),
        )
        return format_html(
            '{}<table class="omni-tool-calls"><thead><tr><th>Created</th><th>Tool</th><th>Input</th>'
            "<th>Status</th><th>Decision</th><th>Decided by</th><th>Decided at</th>"
            "<th>Duration</th><th>Result</th></tr></thead><tbody>{}</tbody></table>",
            more, rows,
        )

    # The audit goes with its thread: ToolCallAdmin lets no one delete a call
    # on its own, which the admin would otherwise count as a permission the
    # thread's deletion lacks.
    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(ToolCall._meta.verbose_name)
        return deleted, counts, perms_needed, protected

    # Deletes go through the session service, so they erase what it erases.
    def delete_model(self, request, obj):
        self._delete(request, obj.thread_id, obj.resource_id)

    def delete_queryset(self, request, queryset):
        for thread_id, resource_id in queryset.values_list("thread_id", "resource_id"):
            self._delete(request, thread_id, resource_id)

    def _delete(self, request, thread_id, resource_id):
        try:
            async_to_sync(services.delete_session)(thread_id, resource_id)
        except services.EraseFailed as exc:
            # The mapping and the rows are gone; say what was left on disk
            # (and go on with the rest of a bulk delete) instead of a 500.
            self.message_user(request, exc.message, messages.ERROR)
        except NotFound:
            pass  # deleted meanwhile


@admin.register(ToolCall)
class ToolCallAdmin(admin.ModelAdmin):
    """The audit of tool calls and decisions (contract §9): written by the
    turns only, so read-only here, and deleted only with its thread."""

    list_display = (
        "created_at", "resource_id", "thread", "tool", "status", "decision", "decided_by", "duration",
    )
    # Resources are too many for a filter: search them.
    list_filter = ("tool", "status", "decision", "needs_approval")
    search_fields = ("thread_id", "resource_id", "tool", "approval_id", "turn_id")
    ordering = ("-created_at", "-id")
    list_per_page = 50
    fieldsets = (
        (None, {"fields": (
            "thread", "resource_id", "session_id", "turn_id", "tool_use_id", "tool",
            "needs_approval", "status",
        )}),
        ("Input", {"fields": ("pretty_input",)}),
        ("Decision", {"fields": (
            "approval_id", "expires_at", "decision", "decided_by", "decided_at", "decision_message",
            "continued_by",
        )}),
        ("Result", {"fields": ("result_preview", "is_error")}),
        ("Times", {"fields": ("created_at", "started_at", "finished_at", "duration")}),
    )
    readonly_fields = tuple(f for _, options in fieldsets for f in options["fields"])

    def has_add_permission(self, request):
        return False  # rows are written by the turns

    def has_change_permission(self, request, obj=None):
        return False  # an audit is not edited

    def has_delete_permission(self, request, obj=None):
        return False  # only with its thread (the mapping cascades)

    @admin.display(description="Thread", ordering="thread_id")
    def thread(self, obj):
        return _thread_link(obj.mapping_id, obj.thread_id)

    @admin.display(description="Duration", ordering="duration_ms")
    def duration(self, obj):
        return _duration(obj.duration_ms)

    @admin.display(description="Input")
    def pretty_input(self, obj):
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', _pretty_json(obj.input))

    @admin.display(description="Result (preview)")
    def result_preview(self, obj):
        if not obj.result:
            return "—"
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', obj.result)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are made by ``manage.py issue_token``; here they are listed
    and revoked. The hash is never shown."""

    list_display = ("prefix", "user", "created_at", "last_used_at", "expires_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("prefix", "user__username")
    fields = ("prefix", "user", "created_at", "last_used_at", "expires_at", "revoked_at")
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # issue_token shows the token once; the admin never knows it

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)
