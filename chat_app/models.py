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
