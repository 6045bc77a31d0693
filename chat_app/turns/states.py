"""A turn's states, the moves between them, and how a turn ends.

::

    ADMITTED ──► STARTING ──► STREAMING ──────────────► FINISHING ──► ENDED
       │            ▲  │        │  ▲   │                   ▲
       │            └──┼────────┘  │   ▼                   │
       │               │           │  WAITING ──► CONTINUING
       └───────────────┼───────────┼────────────────┘      │
                       └───────────┴── (any failure) ──────┘

* ``ADMITTED``: the admission path (:mod:`.admission`) took the thread's
  lease, checked the budget and the limits and reserved a process; the
  turn's task has not run yet.
* ``STARTING``: the session is adopted, the CLI connected (a cold process) and
  the message sent. Again from ``STREAMING`` when the stored session cannot be
  resumed (a fresh session with a ``notice``).
* ``STREAMING``: the CLI's messages become events.
* ``WAITING``: a tool call waits for a person's decision; no process is held,
  the lease is renewed.
* ``CONTINUING``: a decision came (or a turn was started to go on after one):
  admitted again (budget, limits, a process), the session resumed.
* ``FINISHING``: the last save (the mapping, the turn's record and cost, the
  lease's end), the process given back or closed.
* ``ENDED``: the last event (``done`` or ``error``) is published.

Every move goes through :meth:`Turn._enter <chat_app.turns.runner.Turn._enter>`,
which refuses one this table does not allow. How the turn ends (its last
event and its record's outcome) is an :class:`Ending`, decided once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    ADMITTED = "admitted"
    STARTING = "starting"
    STREAMING = "streaming"
    WAITING = "waiting"
    CONTINUING = "continuing"
    FINISHING = "finishing"
    ENDED = "ended"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.ADMITTED: frozenset({State.STARTING, State.CONTINUING, State.FINISHING}),
    State.STARTING: frozenset({State.STREAMING, State.FINISHING}),
    State.STREAMING: frozenset({State.STARTING, State.WAITING, State.FINISHING}),
    State.WAITING: frozenset({State.CONTINUING, State.FINISHING}),
    State.CONTINUING: frozenset({State.STREAMING, State.FINISHING}),
    State.FINISHING: frozenset({State.ENDED}),
    State.ENDED: frozenset(),
}

# Endings decided from outside the turn: it saves nothing more.
STOPPED = frozenset({"thread_deleted", "lease_lost"})


class BadTransition(RuntimeError):
    """A move the table does not allow: a bug in the turn's code."""


@dataclass(frozen=True)
class Ending:
    """How a turn ended: its last event and its record's outcome."""

    event: dict
    outcome: str

    @classmethod
    def of(cls, event: dict, *, interrupted: bool = False) -> Ending:
        if event.get("type") == "done":
            if interrupted:
                outcome = "interrupted"
            else:
                outcome = "model_error" if event["result"]["isError"] else "done"
        else:
            outcome = event.get("code", "error")
        return cls(event, outcome[:64])

    @property
    def stopped(self) -> bool:
        """Stopped from outside (its thread deleted, its lease lost)."""
        return self.outcome in STOPPED
