"""The turn pipeline: one conversation turn through the Claude Agent SDK.

One job a module, imports pointing down only:

* :mod:`.buffer`: a turn's events, numbered and named (``seq``, ``turnId``,
  ``threadId``), kept and handed to every listener;
* :mod:`.states`: a turn's states, the moves allowed between them, and how
  it ends (:class:`~.states.Ending`, decided once);
* :mod:`.store`: moving and saving the turn's session (the database is the
  truth; a fork reads its parent, never moves it; a deleted thread stays
  deleted);
* :mod:`.runner`: :class:`Turn`, the state machine that drives the SDK on a
  process of the pool; it owns its lease and its process slot while it runs;
* :mod:`.registry`: this process's turns, running and lingering;
* :mod:`.admission`: the one admission path of every turn (lease, the
  kind's checks, budget, limits, a process, metrics);
* :mod:`.start`: validating a request and admitting it.

Above them: :mod:`chat_app.streams` (followers and interrupts on any worker),
:mod:`chat_app.lifecycle` (the server's start and shutdown) and the transports.
"""

from .registry import process_counts, registry
from .runner import Turn, TurnSpec
from .start import start_turn

__all__ = ["Turn", "TurnSpec", "process_counts", "registry", "start_turn"]
