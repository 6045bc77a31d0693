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
    # A tool call of the thread waits for a person's decision (its
    # ToolCall.approval_id): the thread is busy until it is decided.
    pending_approval_id = models.CharField(max_length=64, null=True, blank=True)
    # The thread's model spend so far (the sum of its turns' own costs).
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)

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


class ToolCall(models.Model):
    """One tool call of a thread's agent, and the decision on it: the audit
    trail (contract §9), deleted with its thread (the mapping cascades).

    A call that needs approval is ``pending`` (with ``approval_id`` and
    ``expires_at``) until a person decides or it expires (``decided``, with
    ``decision``, ``decided_by``, ``decided_at``); then the turn that
    continues the conversation claims it (``continued_by``), and the call
    runs (``running`` → ``done``/``error``) or is refused (``refused``: the
    model is told, it never ran). A call that needs none goes ``running`` →
    ``done``/``error``. ``result`` keeps a preview of what the tool returned.
    """

    PENDING, DECIDED, RUNNING, DONE, ERROR, REFUSED = (
        "pending", "decided", "running", "done", "error", "refused")
    STATUSES = [(s, s) for s in (PENDING, DECIDED, RUNNING, DONE, ERROR, REFUSED)]
    DECISIONS = [("allow", "allow"), ("deny", "deny"), ("expired", "expired")]

    mapping = models.ForeignKey(SessionMapping, on_delete=models.CASCADE, related_name="tool_calls")
    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    turn_id = models.CharField(max_length=64)
    session_id = models.CharField(max_length=128)
    tool_use_id = models.CharField(max_length=128)
    tool = models.CharField(max_length=255)
    input = models.TextField(default="{}", help_text="the call's input, as JSON")
    needs_approval = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=STATUSES)
    approval_id = models.CharField(max_length=64, null=True, blank=True, unique=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    decision = models.CharField(max_length=16, choices=DECISIONS, null=True, blank=True)
    decided_by = models.CharField(max_length=150, blank=True, default="")
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_message = models.TextField(blank=True, default="")
    continued_by = models.CharField(max_length=64, null=True, blank=True,
                                    help_text="the turn that continued after the decision")
    result = models.TextField(blank=True, default="", help_text="a preview of the tool's result")
    is_error = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session_id", "tool_use_id"], name="uniq_tool_call_use"),
        ]
        indexes = [
            models.Index(fields=["resource_id", "thread_id", "created_at"], name="idx_tool_call_thread"),
            models.Index(fields=["status", "expires_at"], name="idx_tool_call_status"),
        ]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.tool} ({self.status})"


class TurnRecord(models.Model):
    """What one turn used and cost (contract §10): its own figures, never a
    Claude process's running total. Kept when its thread is deleted (the
    spend was real): usage and budgets sum these per resource and UTC day.
    ``day`` is stored (not derived in SQL), so sums need no date functions
    (a remote libSQL database has none)."""

    turn_id = models.CharField(max_length=64, unique=True)
    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    agent = models.CharField(max_length=64, blank=True, default="")
    model = models.CharField(max_length=128, blank=True, default="")
    started_at = models.DateTimeField()
    day = models.DateField(help_text="the UTC day the turn started")
    duration_ms = models.PositiveIntegerField(default=0)
    first_text_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=64, help_text="done, interrupted, or an error code")
    worker = models.CharField(max_length=255, blank=True, default="")
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cache_read_tokens = models.PositiveBigIntegerField(default=0)
    cache_write_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)

    class Meta:
        indexes = [
            models.Index(fields=["resource_id", "day"], name="idx_turn_record_day"),
            models.Index(fields=["day"], name="idx_turn_record_all_days"),
        ]
        ordering = ["-started_at", "-id"]

    def __str__(self) -> str:
        return f"{self.resource_id}/{self.thread_id} {self.outcome} ${self.cost_usd}"


class ResourceBudget(models.Model):
    """A resource's own daily budget, over ``OMNI_DAILY_BUDGET_USD`` (set in the admin)."""

    resource_id = models.CharField(max_length=128, unique=True)
    daily_usd = models.DecimalField(
        max_digits=12, decimal_places=4, null=True, blank=True,
        help_text="USD per UTC day; empty: no cap for this resource (whatever the default)")
    note = models.CharField(max_length=200, blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.resource_id}: {self.daily_usd if self.daily_usd is not None else 'no cap'}"


class HealthBeat(models.Model):
    """The one row (``id`` 1) that ``GET /api/health`` rewrites to learn that
    the database still takes a write (``omni.health``): a read-only file,
    mount or server fails that commit where a ``SELECT`` still works. Every
    worker rewrites the same row, at most every ``WRITE_SECONDS``; nothing
    else reads it."""

    written_at = models.DateTimeField()


class Attachment(models.Model):
    """An uploaded image, PDF or text file of a resource (contract §11).

    The bytes live in the ``attachments`` storage (``STORAGES``: files under
    ``<OMNI_DATA_DIR>/attachments/`` or an S3 bucket) under ``storage_name``;
    what is stored is what the model is sent: an image scaled down and
    stripped of its metadata, a PDF or text file as uploaded. ``sha256`` is
    of those stored bytes: a transcript's content block names its
    attachment by it (the CLI keeps the blocks, not our ids).

    ``sent_at`` is set when a message first carries it; one never sent is
    deleted after ``OMNI_ATTACHMENT_ORPHAN_HOURS``. :class:`AttachmentUse`
    says which threads carry it: deleting a thread deletes the attachments
    no other thread uses.
    """

    attachment_id = models.CharField(max_length=64, unique=True)
    resource_id = models.CharField(max_length=128)
    name = models.CharField(max_length=255)
    media_type = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    pages = models.PositiveIntegerField(null=True, blank=True)
    storage_name = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True, help_text="first sent in a message")

    class Meta:
        indexes = [
            models.Index(fields=["resource_id", "sha256"], name="idx_attachment_sha"),
            models.Index(fields=["sent_at", "created_at"], name="idx_attachment_orphan"),
        ]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.media_type})"

    @property
    def is_image(self) -> bool:
        return self.media_type.startswith("image/")


class AttachmentUse(models.Model):
    """A thread whose messages carry an attachment (its own, or a fork's
    parent's): kept until the thread is deleted."""

    attachment = models.ForeignKey(Attachment, on_delete=models.CASCADE, related_name="uses")
    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["attachment", "thread_id"], name="uniq_attachment_use"),
        ]
        indexes = [models.Index(fields=["resource_id", "thread_id"], name="idx_attachment_use_thread")]

    def __str__(self) -> str:
        return f"{self.attachment_id} in {self.resource_id}/{self.thread_id}"
