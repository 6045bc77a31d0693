from asgiref.sync import async_to_sync
from django.contrib import admin

from . import services
from .models import SessionMapping


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
        "forked_from_thread_id", "message_count",
    )
    fields = readonly_fields[:3] + ("agent", "title", "last_message") + readonly_fields[3:]
    list_per_page = 50

    def has_add_permission(self, request):
        return False  # mappings are made by chat turns

    # Deletes go through the session service, so they erase what it erases.
    def delete_model(self, request, obj):
        async_to_sync(services.delete_session)(obj.thread_id, obj.resource_id)

    def delete_queryset(self, request, queryset):
        for thread_id, resource_id in queryset.values_list("thread_id", "resource_id"):
            async_to_sync(services.delete_session)(thread_id, resource_id)
