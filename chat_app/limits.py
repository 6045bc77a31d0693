"""Per-resource limits on starting turns (contract §4: 429 ``rate_limited``
with ``Retry-After``).

:data:`turn_rate` allows ``OMNI_TURNS_PER_MINUTE`` turn starts per resource
in any sliding 60 seconds (0: no limit). It counts in this process: with
several server processes each counts its own, so a resource may start up to
that many turns per minute on each.
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
