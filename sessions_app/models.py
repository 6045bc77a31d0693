from django.conf import settings
from django.db import models

# Thread and resource ids (contract §4): one pattern for every validator.
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
    # Bumped by every write of the mapping: a warm Claude process that last
    # saw an older version answers no more (another server took a turn).
    version = models.PositiveIntegerField(default=1)

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
        # Cross-resource access (contract §6): naming another resource than
        # one's own needs this (superusers have it); the staff flag alone
        # does not give it. Checked in sessions_app.resources.
        permissions = [
            ("access_all_resources", "Can read and act on every resource's threads"),
        ]

    def __str__(self) -> str:
        return f"{self.resource_id}/{self.thread_id}"


class TranscriptEntry(models.Model):
    """One transcript line mirrored through the SDK's ``SessionStore``
    (``sessions_app.transcripts.DjangoSessionStore``).

    ``id`` orders the lines of a key; ``data`` is the entry as JSON text
    (exact round trip, no JSON1/JSONB dependency); ``uuid`` is the entry's
    idempotency key, unique per key when present.
    """

    project_key = models.CharField(max_length=255)
    session_id = models.CharField(max_length=255)
    subpath = models.CharField(max_length=1024, blank=True, default="")  # "" = main transcript
    uuid = models.CharField(max_length=255, null=True, blank=True)
    data = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project_key", "session_id", "subpath", "uuid"],
                condition=models.Q(uuid__isnull=False),
                name="uniq_transcript_entry_uuid",
            ),
        ]
        indexes = [
            # session_id first: serves load/list_subkeys/delete for a key and
            # the by-session lookups (erase_session) with one index.
            models.Index(
                fields=["session_id", "project_key", "subpath", "id"], name="idx_transcript_key"
            ),
        ]

    def __str__(self) -> str:
        key = f"{self.project_key}/{self.session_id}"
        return f"{key}/{self.subpath}#{self.pk}" if self.subpath else f"{key}#{self.pk}"


class TranscriptSummary(models.Model):
    """Per main transcript: the SDK's folded summary (``data``, opaque JSON
    text) and the storage write time ``mtime_ms`` (epoch ms) that
    ``list_sessions`` and ``list_session_summaries`` both report."""

    project_key = models.CharField(max_length=255)
    session_id = models.CharField(max_length=255, db_index=True)
    mtime_ms = models.BigIntegerField()
    data = models.TextField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project_key", "session_id"], name="uniq_transcript_summary_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project_key}/{self.session_id}"


class ApiToken(models.Model):
    """An API token of a user (contract §6), made by ``issue_token``.

    Only the SHA-256 of the token is stored (tokens are 256 random bits, so
    a plain hash is enough); ``prefix`` is its first characters, kept
    readable to tell tokens apart in the admin and to revoke one.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    prefix = models.CharField(max_length=16, db_index=True)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"
