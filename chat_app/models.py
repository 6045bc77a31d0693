from django.db import models


class ThreadLease(models.Model):
    """Who runs the turn of a thread, across every server process.

    One row per thread that ever ran a turn. The lease is held while
    ``expires_at`` is in the future; the holder renews it while its turn runs
    and lets it lapse at the end. ``token`` is the fencing token: it grows by
    one on every take, so a holder that lost its lease (stalled past the
    expiry, then taken over) finds another token in the row and stops.
    """

    resource_id = models.CharField(max_length=128)
    thread_id = models.CharField(max_length=128)
    owner = models.CharField(max_length=200, default="")
    token = models.BigIntegerField(default=1)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["resource_id", "thread_id"], name="uniq_thread_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.resource_id}/{self.thread_id} #{self.token}"
