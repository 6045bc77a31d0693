from django.db import models

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class SessionMapping(models.Model):
    """One conversation: ``(thread_id, resource_id) -> session_id`` (contract §3).

    ``session_id`` is the Claude session the thread resumes; the CLI may
    report a new one on any turn and the mapping follows it.
    """

    thread_id = models.CharField(max_length=128)
    resource_id = models.CharField(max_length=128)
    session_id = models.CharField(max_length=128, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    agent = models.CharField(max_length=64, default="smart")
    title = models.CharField(max_length=200, blank=True, default="")
    last_message = models.TextField(blank=True, default="")
    message_count = models.PositiveIntegerField(default=0)
    forked_from_thread_id = models.CharField(max_length=128, null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["thread_id", "resource_id"], name="uniq_session_mapping_thread_resource"
            ),
        ]
        indexes = [
            models.Index(fields=["resource_id", "-updated_at"], name="idx_session_resource"),
        ]
        ordering = ["-updated_at", "-id"]

    def __str__(self) -> str:
        return f"{self.resource_id}/{self.thread_id}"
