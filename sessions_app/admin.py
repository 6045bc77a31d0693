import json
from datetime import timedelta
from decimal import Decimal
from urllib.parse import urlencode

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.db.models import DecimalField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

from . import services, transcripts, usage

from .attachments import services as attachment_services
from .errors import BadRequest, NotFound
from .models import (
    ApiToken, Attachment, AttachmentUse, ResourceBudget, SessionMapping, ToolCall, TurnRecord,
)

# The thread's page shows its latest calls; the audit list has them all.
THREAD_CALLS_SHOWN = 100
# ... and its latest turns' usage records; the records' list has them all.
THREAD_TURNS_SHOWN = 20
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


def _size(size) -> str:
    """A byte count as people read it: "1.2 MB", "340 KB", "12 B"."""
    size = int(size or 0)
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB".replace(".0 MB", " MB")
    if size >= 1024:
        return f"{round(size / 1024)} KB"
    return f"{size} B"


def _content_url(attachment) -> str:
    """The admin's own view of an attachment's bytes (staff only, any resource)."""
    return reverse("admin:sessions_app_attachment_content", args=[attachment.pk])


def _attachment_link(attachment) -> str:
    url = reverse("admin:sessions_app_attachment_change", args=[attachment.pk])
    return format_html('<a href="{}">{}</a>', url, attachment.name)


def _thumbnail(attachment) -> str:
    """A small image for an image (the staff view's URL, sized by CSS: never
    the bytes in the page), a download link for anything else."""
    if attachment.is_image:
        return format_html(
            '<a href="{}" target="_blank" rel="noopener"><img src="{}" alt="{}" loading="lazy" '
            'class="omni-attachment-thumb" style="max-width: 120px; max-height: 90px; '
            'object-fit: contain; border: 1px solid #ccc; vertical-align: middle"></a>',
            _content_url(attachment), _content_url(attachment), attachment.name,
        )
    return format_html('<a href="{}" download>Download</a>', _content_url(attachment))


def _bytes_response(attachment, opened):
    """The bytes as ``GET /api/attachments/<id>`` sends them (its headers)."""
    from .attachments.api import bytes_response

    return bytes_response(attachment, opened, cache_control="private, max-age=3600")


def _thread_link(mapping_id, thread_id):
    url = reverse("admin:sessions_app_sessionmapping_change", args=[mapping_id])
    return format_html('<a href="{}">{}</a>', url, thread_id)


def _calls_list_url(mapping_id) -> str:
    return reverse("admin:sessions_app_toolcall_changelist") + f"?mapping__id__exact={mapping_id}"


def _usd(value) -> str:
    """An amount in USD as the usage pages show it (six decimals: a turn can
    cost a fraction of a cent)."""
    return f"${Decimal(value or 0):.6f}"


def _records_url(**lookups) -> str:
    """The usage records' list filtered by plain field lookups (no date
    functions: ``day`` is a stored column)."""
    return reverse("admin:sessions_app_turnrecord_changelist") + "?" + urlencode(lookups)


# Parts of a thread's page that an app above this one draws (this app imports
# none of them): name -> (the model whose view permission shows it,
# ``render(resource_id, thread_id) -> HTML``). chat_app.admin adds "queue".
# A part no app added is left out of the page.
THREAD_PARTS: dict[str, tuple] = {}
ADDED_PARTS = ("queue",)


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
        "forked_from", "message_count", "cost", "turn_records", "conversation", "queue", "attachments",
        "tool_calls",
    )
    fields = readonly_fields[:3] + ("agent", "title", "last_message") + readonly_fields[3:]
    list_per_page = 50

    def has_add_permission(self, request):
        return False  # mappings are made by chat turns

    # The thread's tool calls and its turns' usage records are shown only to
    # who may view them on their own pages (ToolCallAdmin, TurnRecordAdmin).
    PARTS_NEED = {"tool_calls": ToolCall, "turn_records": TurnRecord, "attachments": Attachment}

    def get_fields(self, request, obj=None):
        needs = {**self.PARTS_NEED, **{name: part[0] for name, part in THREAD_PARTS.items()}}
        return [name for name in super().get_fields(request, obj)
                if (name not in needs and name not in ADDED_PARTS)
                or (name in needs and self._may_view(request, needs[name]))]

    def _may_view(self, request, model) -> bool:
        """What the model's own admin page asks (its view or change permission)."""
        model_admin = self.admin_site._registry.get(model)
        return model_admin is not None and model_admin.has_view_permission(request)

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

    @admin.display(description="Cost (USD)")
    def cost(self, obj):
        """What the thread's turns cost (their records' sum, kept on the mapping)."""
        return _usd(obj.cost_usd)

    @admin.display(description="Turns")
    def turn_records(self, obj):
        """The usage records of the thread's latest turns, newest first; the
        records' list has them all. (Records outlive their thread: a thread
        deleted and made again under the same id shows the old ones too.)"""
        records = list(
            TurnRecord.objects.filter(resource_id=obj.resource_id, thread_id=obj.thread_id)
            .order_by("-started_at", "-id")[:THREAD_TURNS_SHOWN + 1]
        )
        if not records:
            return "No turns recorded."
        all_url = _records_url(resource_id=obj.resource_id, thread_id=obj.thread_id)
        if len(records) > THREAD_TURNS_SHOWN:
            records = records[:THREAD_TURNS_SHOWN]
            more = format_html(
                '<p>Only the latest {} are shown: <a href="{}">all of this thread\'s turns</a>.</p>',
                THREAD_TURNS_SHOWN, all_url,
            )
        else:
            more = format_html('<p><a href="{}">These turns in the usage records</a></p>', all_url)
        rows = format_html_join(
            "",
            '<tr data-turn-record="{}"><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    r.turn_id, reverse("admin:sessions_app_turnrecord_change", args=[r.pk]),
                    _when(r.started_at), r.agent or "—", r.model or "—", r.outcome,
                    _duration(r.duration_ms), _duration(r.first_text_ms),
                    r.input_tokens, r.output_tokens, _usd(r.cost_usd),
                )
                for r in records
            ),
        )
        return format_html(
            '{}<table class="omni-turn-records"><thead><tr><th>Started</th><th>Agent</th><th>Model</th>'
            "<th>Outcome</th><th>Duration</th><th>First text</th><th>Input tokens</th>"
            "<th>Output tokens</th><th>Cost</th></tr></thead><tbody>{}</tbody></table>",
            more, rows,
        )

    @admin.display(description="Conversation")
    def conversation(self, obj):
        """The transcript from the database, read-only."""
        messages = transcripts.transcript_messages(transcripts.main_transcript(obj.session_id))
        if not messages:
            return "No stored transcript."
        # A message's images and documents as one line each ([image/png, 1.2 MB]), the
        # upload's name linked when it is still stored: never their bytes.
        find = attachment_services.uploads_named_sync(
            obj.resource_id, [ref for m in messages for ref in m.get("attachments") or ()])
        return format_html(
            '<div class="omni-conversation">{}</div>',
            format_html_join(
                "",
                '<p data-uuid="{}"><strong>{}</strong>: <span style="white-space: pre-wrap">{}</span>{}</p>',
                ((m["uuid"], m["role"], m["text"], self._blocks(m.get("attachments"), find))
                 for m in messages),
            ),
        )

    @staticmethod
    def _blocks(refs, find) -> str:
        """Each image or document of a message as ``[image/png, 1.2 MB] name``
        (the name linked to the upload's page while it is stored)."""
        if not refs:
            return ""

        def named(ref):
            upload = find(ref)
            if upload is not None:
                return format_html(" {}", _attachment_link(upload))
            return format_html(" {}", ref["name"]) if ref["name"] not in ("image", "document") else ""

        return format_html_join(
            "", '<br><span class="omni-block" data-sha256="{}">[{}, {}]{}</span>',
            ((ref["sha256"], ref["mediaType"] or "attachment", _size(ref["size"]), named(ref)) for ref in refs),
        )

    @admin.display(description="Queue")
    def queue(self, obj):
        """The thread's queued messages (contract §12), drawn by the chat app
        (:data:`THREAD_PARTS`)."""
        return THREAD_PARTS["queue"][1](obj.resource_id, obj.thread_id)

    @admin.display(description="Attachments")
    def attachments(self, obj):
        """The attachments the thread's messages carry (its own and a fork's
        parent's): a thumbnail for an image, a download for anything else."""
        uses = (AttachmentUse.objects.filter(resource_id=obj.resource_id, thread_id=obj.thread_id)
                .select_related("attachment").order_by("attachment__created_at", "attachment__id"))
        found = [use.attachment for use in uses]
        if not found:
            return "No attachments."
        rows = format_html_join(
            "",
            '<tr data-attachment="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            ((a.attachment_id, _thumbnail(a), _attachment_link(a), a.media_type, _size(a.size),
              _when(a.sent_at)) for a in found),
        )
        return format_html(
            '<table class="omni-attachments"><thead><tr><th></th><th>Name</th><th>Type</th><th>Size</th>'
            "<th>First sent</th></tr></thead><tbody>{}</tbody></table>",
            rows,
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


class SentFilter(admin.SimpleListFilter):
    title = "sent"
    parameter_name = "sent"

    def lookups(self, request, model_admin):
        return (("yes", "Sent in a message"), ("no", "Never sent (deleted after OMNI_ATTACHMENT_ORPHAN_HOURS)"))

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(sent_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(sent_at__isnull=True)
        return queryset


@admin.register(Attachment)
class AttachmentAdmin(admin.ModelAdmin):
    """Uploads (contract §11): read-only. They are deleted with the last
    thread that carries them, or after ``OMNI_ATTACHMENT_ORPHAN_HOURS`` when
    never sent, by the attachments service only. ``<id>/content/`` serves
    the bytes to staff who may view attachments (any resource), so thumbnails
    and downloads work here."""

    list_display = ("name", "media_type", "size_display", "resource_id", "created_at", "sent_at")
    list_filter = ("media_type", SentFilter, "created_at")
    search_fields = ("name", "resource_id", "attachment_id")
    ordering = ("-created_at", "-id")
    list_per_page = 100
    fields = (
        "attachment_id", "name", "media_type", "size_display", "dimensions", "pages", "resource_id",
        "created_at", "sent_at", "threads", "preview", "sha256", "storage_name",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # uploaded through POST /api/attachments

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # with their last thread, or as orphans (the service deletes the files too)

    def get_urls(self):
        content = self.admin_site.admin_view(self.content_view)
        return [path("<int:pk>/content/", content, name="sessions_app_attachment_content"),
                *super().get_urls()]

    def content_view(self, request, pk):
        """The stored bytes, with the headers the API's download sends its owner."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        attachment = Attachment.objects.filter(pk=pk).first()
        if attachment is None:
            raise Http404("no such attachment")
        try:
            opened = attachment_services.storage().open(attachment.storage_name, "rb")
        except FileNotFoundError:
            raise Http404("the attachment's file is missing") from None
        except Exception:  # an unreachable bucket
            return HttpResponse("The attachment storage cannot be reached.", status=503,
                                content_type="text/plain; charset=utf-8")
        return _bytes_response(attachment, opened)

    @admin.display(description="Size", ordering="size")
    def size_display(self, obj):
        return _size(obj.size)

    @admin.display(description="Width x height")
    def dimensions(self, obj):
        return f"{obj.width} x {obj.height}" if obj.width and obj.height else "—"

    @admin.display(description="Threads")
    def threads(self, obj):
        uses = list(obj.uses.order_by("created_at", "id"))
        if not uses:
            return "Not sent in any thread."
        mappings = {m.thread_id: m.pk for m in SessionMapping.objects.filter(
            resource_id=obj.resource_id, thread_id__in=[u.thread_id for u in uses]).only("pk", "thread_id")}
        return format_html_join(
            mark_safe("<br>"), "{}",
            ((_thread_link(mappings[u.thread_id], u.thread_id) if u.thread_id in mappings
              else f"{u.thread_id} (deleted)",) for u in uses),
        )

    @admin.display(description="Preview")
    def preview(self, obj):
        return _thumbnail(obj)


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


# --- usage: records, spend per resource and day, budgets (contract §10) ---------------------
#
# Everything here filters on the stored ``day`` (equality and ranges) and sums
# with Sum and Count: no SQL date function (no __date, Trunc or
# date_hierarchy), which a remote libSQL database lacks.

SPEND_PER_PAGE = 100
CHART_RESOURCES = 5  # the chart stacks the selection's top spenders; the rest is "others"
CHART_COLORS = ("#417690", "#e0a030", "#70a050", "#b05070", "#8070c0")
CHART_OTHERS_COLOR = "#b0b0b0"
# The spend page's columns: (key in ?o=, heading, what rows are sorted by).
SPEND_COLUMNS = (
    ("day", "Day", "day"),
    ("resource", "Resource", "resource_id"),
    ("turns", "Turns", "turns"),
    ("input", "Input tokens", "input"),
    ("output", "Output tokens", "output"),
    ("cost", "Cost (USD)", "cost"),
)
SPEND_DEFAULT_ORDER = "-day"


@admin.register(TurnRecord)
class TurnRecordAdmin(admin.ModelAdmin):
    """One record per finished turn, written by the turns: read-only, never
    deleted here (the spend was real and budgets count it). Its list links
    to the spend per resource and day (``spend/``)."""

    list_display = (
        "started_at", "resource_id", "thread_id", "agent", "model", "outcome", "duration",
        "first_text", "input_tokens", "output_tokens", "cost",
    )
    list_filter = ("outcome", "agent")
    search_fields = ("resource_id", "thread_id", "turn_id")
    ordering = ("-started_at", "-id")
    list_per_page = 100
    fields = (
        "turn_id", "resource_id", "thread", "agent", "model", "started_at", "day", "duration",
        "first_text", "outcome", "worker", "input_tokens", "output_tokens", "cache_read_tokens",
        "cache_write_tokens", "cost",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # written by the turns

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # budgets count them; they outlive their thread

    def get_urls(self):
        spend = self.admin_site.admin_view(self.spend_view)
        return [path("spend/", spend, name="sessions_app_turnrecord_spend"), *super().get_urls()]

    @admin.display(description="Duration", ordering="duration_ms")
    def duration(self, obj):
        return _duration(obj.duration_ms)

    @admin.display(description="First text", ordering="first_text_ms")
    def first_text(self, obj):
        return _duration(obj.first_text_ms)

    @admin.display(description="Cost (USD)", ordering="cost_usd")
    def cost(self, obj):
        return _usd(obj.cost_usd)

    @admin.display(description="Thread")
    def thread(self, obj):
        mapping = SessionMapping.objects.filter(
            resource_id=obj.resource_id, thread_id=obj.thread_id).only("pk").first()
        if mapping is None:
            return f"{obj.thread_id} (deleted)"
        return _thread_link(mapping.pk, obj.thread_id)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}),
                         "spend_url": reverse("admin:sessions_app_turnrecord_spend")}
        return super().changelist_view(request, extra_context)

    # --- the spend page ---

    def spend_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            frm, to = usage.parse_range(request.GET.get("from") or None, request.GET.get("to") or None)
        except BadRequest as exc:
            frm, to = usage.parse_range(None, None)
            messages.error(request, f"{exc.message}; showing the last {usage.DEFAULT_DAYS} days instead.")
        q = request.GET.get("q", "").strip()
        order = request.GET.get("o", SPEND_DEFAULT_ORDER)
        keys = {key: field for key, _, field in SPEND_COLUMNS}
        if order.lstrip("-") not in keys:
            order = SPEND_DEFAULT_ORDER
        descending = order.startswith("-")
        sort_field = ("-" if descending else "") + keys[order.lstrip("-")]

        records = TurnRecord.objects.filter(day__gte=frm, day__lte=to)
        if q:
            records = records.filter(resource_id__icontains=q)
        rows = (records.order_by().values("day", "resource_id").annotate(**usage.SUMS)
                .order_by(sort_field, "-day", "resource_id"))
        page = Paginator(rows, SPEND_PER_PAGE).get_page(request.GET.get("p"))
        params = {"from": frm.isoformat(), "to": to.isoformat(), **({"q": q} if q else {})}
        today = usage.today()
        budgets: dict[str, Decimal | None] = {}
        shown = []
        for row in page:
            over = False
            if row["day"] == today:
                if row["resource_id"] not in budgets:
                    budgets[row["resource_id"]] = usage.budget_for_sync(row["resource_id"])
                budget = budgets[row["resource_id"]]
                over = budget is not None and (row["cost"] or 0) >= budget
            shown.append({
                "day": row["day"].isoformat(), "resource_id": row["resource_id"],
                "turns": row["turns"], "input": row["input"] or 0, "output": row["output"] or 0,
                "cost": _usd(row["cost"]), "over_budget": over,
                "records_url": _records_url(resource_id=row["resource_id"], day=row["day"].isoformat()),
            })
        total = records.aggregate(**usage.SUMS)
        columns = []
        for key, heading, _ in SPEND_COLUMNS:
            current = order.lstrip("-") == key
            # A click sorts by the column, descending first; a second click flips it.
            flip = key if current and descending else f"-{key}"
            columns.append({
                "key": key, "heading": heading, "sorted": current, "descending": current and descending,
                "url": "?" + urlencode({**params, "o": flip}),
            })
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Spend per resource and day",
            "subtitle": None,
            "q": q, "from": frm.isoformat(), "to": to.isoformat(), "order": order,
            "max_days": usage.MAX_RANGE_DAYS,
            "columns": columns, "rows": shown, "page": page,
            "page_query": urlencode({**params, "o": order}),
            "total": {"turns": total["turns"] or 0, "input": total["input"] or 0,
                      "output": total["output"] or 0, "cost": _usd(total["cost"])},
            "chart": spend_chart(records, frm, to),
            "records_url": reverse("admin:sessions_app_turnrecord_changelist"),
            "budgets_url": reverse("admin:sessions_app_resourcebudget_changelist"),
            "default_budget": _default_budget(),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sessions_app/turnrecord/spend.html", context)


def spend_chart(records, frm, to) -> dict | None:
    """A stacked bar per day of the range: the cost of the selection's top
    spenders and of the others, as numbers for an inline SVG that the
    template draws (escaping every label). None when nothing was spent."""
    per_day = {row["day"]: row["cost"] or Decimal(0)
               for row in records.order_by().values("day").annotate(cost=Sum("cost_usd"))}
    peak = max(per_day.values(), default=Decimal(0))
    if peak <= 0:
        return None
    top = [row["resource_id"] for row in records.order_by().values("resource_id")
           .annotate(cost=Sum("cost_usd")).order_by("-cost", "resource_id")[:CHART_RESOURCES]
           if (row["cost"] or 0) > 0]
    split: dict = {}
    for row in (records.filter(resource_id__in=top).order_by().values("day", "resource_id")
                .annotate(cost=Sum("cost_usd"))):
        split[(row["day"], row["resource_id"])] = row["cost"] or Decimal(0)

    days = (to - frm).days + 1
    width, left, right, top_margin, plot_height = 760, 70, 10, 10, 160
    plot_width = width - left - right
    step = plot_width / days
    bar = max(step * 0.8, 0.5)
    scale = plot_height / float(peak)
    bottom = top_margin + plot_height
    series = [(name, CHART_COLORS[i]) for i, name in enumerate(top)] + [("others", CHART_OTHERS_COLOR)]
    bars = []
    for i in range(days):
        day = frm + timedelta(days=i)
        day_total = per_day.get(day, Decimal(0))
        if day_total <= 0:
            continue
        y = float(bottom)
        segments = []
        costs = [split.get((day, name), Decimal(0)) for name in top]
        costs.append(day_total - sum(costs))  # the others
        for (name, color), cost in zip(series, costs):
            if cost <= 0:
                continue
            height = float(cost) * scale
            y -= height
            segments.append({"y": f"{y:.2f}", "height": f"{height:.2f}", "color": color,
                             "title": f"{day.isoformat()} {name}: {_usd(cost)}"})
        bars.append({"x": f"{left + i * step + (step - bar) / 2:.2f}", "width": f"{bar:.2f}",
                     "title": f"{day.isoformat()}: {_usd(day_total)}", "segments": segments})
    # Day labels: the first and last days, and a few between.
    marks = sorted({0, days - 1, *range(0, days, max(1, days // 6))})
    if len(marks) > 1 and marks[-1] - marks[-2] < max(1, days // 12):
        marks.pop(-2)  # too close to the last one
    labels = []
    for i in marks:
        # The ends are aligned inside the plot, so no label is cut off.
        anchor, x = ("middle", left + (i + 0.5) * step) if days == 1 or 0 < i < days - 1 else \
            ("start", left + i * step) if i == 0 else ("end", left + (i + 1) * step)
        labels.append({"x": f"{x:.2f}", "anchor": anchor, "text": (frm + timedelta(days=i)).isoformat()})
    has_others = any(s["color"] == CHART_OTHERS_COLOR for b in bars for s in b["segments"])
    legend = [{"name": name, "color": color, "x": 10 + 150 * (n % 5), "y": bottom + 42 + 18 * (n // 5)}
              for n, (name, color) in enumerate(s for s in series if s[0] != "others" or has_others)]
    return {
        "width": width, "height": bottom + 42 + 18 * ((len(legend) + 4) // 5) + 4,
        "left": left, "right": width - right, "top": top_margin, "bottom": bottom,
        "label_y": bottom + 16, "mid_y": f"{top_margin + plot_height / 2:.2f}",
        "peak": f"${peak:.4f}", "half": f"${peak / 2:.4f}", "bars": bars, "labels": labels, "legend": legend,
    }


def _default_budget() -> str:
    default = Decimal(str(settings.OMNI_DAILY_BUDGET_USD or 0))
    return f"${default:.2f} per UTC day (OMNI_DAILY_BUDGET_USD)" if default > 0 else \
        "no cap (OMNI_DAILY_BUDGET_USD is 0)"


class ResourceBudgetForm(forms.ModelForm):
    class Meta:
        model = ResourceBudget
        fields = ("resource_id", "daily_usd", "note")

    def clean_daily_usd(self):
        amount = self.cleaned_data.get("daily_usd")
        if amount is None:
            return None
        if amount < 0:
            raise forms.ValidationError("A budget cannot be negative.")
        if amount == 0:
            # The budget check reads 0 as "no cap" (like OMNI_DAILY_BUDGET_USD=0):
            # say so instead of storing a 0 that looks like a block.
            raise forms.ValidationError(
                "0 would mean no cap: leave the amount empty for no cap, or give an amount above 0.")
        return amount


@admin.register(ResourceBudget)
class ResourceBudgetAdmin(admin.ModelAdmin):
    """A resource's own daily budget, over OMNI_DAILY_BUDGET_USD (contract
    §10); an empty amount is no cap for that resource. No worker caches
    overrides (every budget check reads the database): a change here applies
    on every worker at the next check."""

    form = ResourceBudgetForm
    list_display = ("resource_id", "budget", "spent", "status", "note", "updated_at")
    search_fields = ("resource_id", "note")
    ordering = ("resource_id",)
    fields = ("resource_id", "daily_usd", "note", "spent", "updated_at")
    readonly_fields = ("spent", "updated_at")
    list_per_page = 100

    def get_queryset(self, request):
        spent = (TurnRecord.objects.filter(resource_id=OuterRef("resource_id"), day=usage.today())
                 .order_by().values("resource_id").annotate(total=Sum("cost_usd")).values("total"))
        money = DecimalField(max_digits=14, decimal_places=8)
        # 0 (not NULL) for no spend, so it sorts the same on every engine.
        return super().get_queryset(request).annotate(spent_today=Coalesce(
            Subquery(spent, output_field=money), Value(Decimal(0)), output_field=money))

    @admin.display(description="Daily budget (USD)", ordering="daily_usd")
    def budget(self, obj):
        return "no cap" if not obj.daily_usd else f"${obj.daily_usd:.2f}"

    @admin.display(description="Spent today (UTC)", ordering="spent_today")
    def spent(self, obj):
        if obj.pk is None:
            return "—"
        amount = obj.spent_today if hasattr(obj, "spent_today") else usage.spent_sync(obj.resource_id)
        url = reverse("admin:sessions_app_turnrecord_spend") + "?" + urlencode({"q": obj.resource_id})
        return format_html('<a href="{}">{}</a>', url, _usd(amount))

    @admin.display(description="Today")
    def status(self, obj):
        amount = obj.spent_today or Decimal(0)
        if not obj.daily_usd:
            return "—"
        if amount >= obj.daily_usd:
            return format_html('<strong class="{}">over budget</strong>', "omni-over-budget")
        return f"{_usd(obj.daily_usd - amount)} left"

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "default_budget": _default_budget(),
                         "spend_url": reverse("admin:sessions_app_turnrecord_spend")}
        return super().changelist_view(request, extra_context)
