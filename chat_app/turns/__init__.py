"""The turn pipeline: one conversation turn through the Claude Agent SDK.

One job a module, imports pointing down only:

* :mod:`.buffer`: a turn's events, numbered and named (``seq``, ``turnId``,
  ``threadId``), kept and handed to every listener;
* :mod:`.store`: moving and saving the turn's session (the database is the
  truth; a fork reads its parent, never moves it; a deleted thread stays
  deleted);
* :mod:`.runner`: driving the SDK on a process of the pool;
* :mod:`.registry`: this process's turns, running and lingering;
* :mod:`.start`: validating a request, taking the thread's lease, the
  limits, and starting the turn.

Above them: :mod:`chat_app.streams` (followers and interrupts on any worker),
:mod:`chat_app.lifecycle` (the server's shutdown order) and the transports.
"""

from .registry import process_counts, registry
from .runner import Turn, TurnSpec
from .start import start_turn

__all__ = ["Turn", "TurnSpec", "process_counts", "registry", "start_turn"]
