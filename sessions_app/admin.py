from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from . import services, transcripts
from .errors import NotFound
from .models import ApiToken, SessionMapping


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
        "forked_from", "message_count", "conversation",
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
