from django.db import models


class ThreadLease(models.Model):
    """Who runs the turn of a thread, across every server process.

    One row per thread that ran a turn (deleted with its thread). The lease
    is held while ``expires_at`` is in the future; the holder renews it while
    its turn runs and lets it lapse at the end. ``token`` is the fencing
    token: it grows by one on every take, so a holder that lost its lease
    (stalled past the expiry, then taken over) finds another token in the row
    and stops. ``turn_id`` names the turn that took it (the ``turnId`` of its
    events). ``host_id``, ``pid`` and ``pid_started`` name the server process
    that holds it, so a worker restarted on the same host recognises a lease
    of a process that died and takes it at once (:mod:`chat_app.leases`).
    """

    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    turn_id = models.CharField(max_length=64, default="")
    token = models.BigIntegerField(default=1)
    expires_at = models.DateTimeField()
    host = models.CharField(max_length=255, default="", help_text="the holder's host name (for people)")
    host_id = models.CharField(
        max_length=64, default="",
        help_text="the holder's host: its boot id, pid namespace and name, hashed")
    pid = models.IntegerField(null=True)
    pid_started = models.BigIntegerField(
        null=True, help_text="the holder process's start time (clock ticks after boot)")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["resource_id", "thread_id"], name="uniq_thread_lease"),
        ]
        indexes = [models.Index(fields=["resource_id", "expires_at"], name="lease_resource_live")]

    def __str__(self) -> str:
        return f"{self.resource_id}/{self.thread_id} #{self.token}"


class TurnStart(models.Model):
    """A turn start counted against ``OMNI_TURNS_PER_MINUTE`` (the database
    backend of :mod:`chat_app.limits`, used without ``REDIS_URL``).

    A resource has one row per *slot*, ``0 .. limit-1``; a slot is taken
    while its start is under 60 s old (``started_ms``: Unix time in
    milliseconds, the worker's clock). A start takes a free slot in one
    upsert conditional on the slot being free, so two workers can never
    both count in the same slot: at most ``limit`` starts a minute, across
    workers, on every engine. A cancelled start (the turn never ran)
    deletes its row; rows of starts over a minute old are pruned.
    """

    resource_id = models.CharField(max_length=128)
    slot = models.IntegerField()
    turn_id = models.CharField(max_length=128)
    started_ms = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["resource_id", "slot"], name="uniq_turn_start_slot"),
        ]

    def __str__(self) -> str:
        return f"{self.resource_id} slot {self.slot}: {self.turn_id}"


class QueuedMessage(models.Model):
    """A message sent to a busy thread with ``ifBusy`` ``enqueue`` or
    ``interrupt`` (contract §12), kept until its turn has started.

    Rows of a thread run in ``(priority, id)`` order: ``interrupt`` messages
    (priority 0) before ``enqueue`` ones (1), each kind first come first
    served. ``state`` moves ``waiting`` → ``starting`` (a worker admitted its
    turn, ``turn_id``, under the thread's lease) → ``started`` (the message
    is stored in the thread's transcript: from here on it is history, not a
    queue entry), or → ``cancelled`` / ``failed`` (refused when its turn was
    to start: ``error_code``, ``error_message``). A ``starting`` row whose
    worker died before the message was stored runs again, under the same
    ``turn_id``, once another worker takes the thread's lease. Ended rows
    are kept a while so a waiting stream on any worker learns the outcome,
    then pruned; every row goes with its thread.
    """

    WAITING, STARTING, STARTED, CANCELLED, FAILED = "waiting", "starting", "started", "cancelled", "failed"
    STATES = [(s, s) for s in (WAITING, STARTING, STARTED, CANCELLED, FAILED)]
    OPEN = (WAITING, STARTING)  # still to run (a starting row's turn may have died)
    ENQUEUE, INTERRUPT = "enqueue", "interrupt"

    queue_id = models.CharField(max_length=64, unique=True)
    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    turn_id = models.CharField(max_length=64, help_text="the turn that runs it (its events' turnId)")
    message = models.TextField(blank=True)
    attachment_ids = models.JSONField(default=list, blank=True)
    agent = models.CharField(max_length=64, blank=True, help_text="as the request named it (blank: the thread's)")
    chunks = models.BooleanField(default=True)
    mode = models.CharField(max_length=16, choices=[(ENQUEUE, ENQUEUE), (INTERRUPT, INTERRUPT)])
    priority = models.SmallIntegerField(default=1)
    position = models.IntegerField(default=1, help_text="its place in the queue when it was queued (1: next)")
    created_by = models.CharField(max_length=150, blank=True, help_text="who sent it (user name)")
    created_at = models.DateTimeField()
    state = models.CharField(max_length=16, choices=STATES, default=WAITING)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True, help_text="started, cancelled or refused")
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["resource_id", "thread_id", "state", "priority", "id"], name="queue_thread_order"),
            models.Index(fields=["state", "created_at"], name="queue_state_created"),
        ]

    def __str__(self) -> str:
        return f"{self.queue_id} on {self.resource_id}/{self.thread_id} ({self.state})"
