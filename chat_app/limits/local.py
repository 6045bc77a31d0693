"""The per-process turn rate of old: each server process counted its own
starts in memory, so N workers allowed N times ``OMNI_TURNS_PER_MINUTE``.

Kept only for callers and tests written against it (``limits.turn_rate``);
turns are admitted by :func:`chat_app.limits.admit`, which counts across
every process. Nothing in the project's turn path uses this.
"""

import math
import threading
import time
from collections import deque

from django.conf import settings

from sessions_app.errors import RateLimited

WINDOW = 60.0  # seconds


class TurnRate:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._starts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, resource: str) -> None:
        """Count a turn start for ``resource``, or raise :class:`RateLimited`."""
        limit = settings.OMNI_TURNS_PER_MINUTE
        if limit <= 0:
            return
        with self._lock:
            now = self.clock()
            starts = self._starts.setdefault(resource, deque())
            while starts and now - starts[0] >= WINDOW:
                starts.popleft()
            if len(starts) >= limit:
                wait = math.ceil(WINDOW - (now - starts[0]))
                raise RateLimited(
                    f"resource {resource!r} started {limit} turns in the last minute; "
                    f"try again in {wait} s",
                    retry_after=wait,
                )
            starts.append(now)
            if len(self._starts) > 10_000:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        for resource in [r for r, s in self._starts.items() if not s or now - s[-1] >= WINDOW]:
            del self._starts[resource]

    def reset(self) -> None:
        with self._lock:
            self._starts.clear()


turn_rate = TurnRate()
