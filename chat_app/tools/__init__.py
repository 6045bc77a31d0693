"""Tools an agent acts through (contract §9).

The project's own tools are Python coroutines registered with
:func:`omni_tool` and served in-process as the MCP server ``omni`` (the model
sees ``mcp__omni__<name>``). A preset lists the ones its agent has. A Django project adds its own in an
``omni_tools.py`` module of any installed app (found like ``admin.py``)::

    # myapp/omni_tools.py
    from chat_app.tools import omni_tool

    @omni_tool("count_threads", "How many conversations the caller has.", {})
    async def count_threads(args, caller):
        from sessions_app.models import SessionMapping
        n = await SessionMapping.objects.filter(resource_id=caller.resource_id).acount()
        return f"{n} conversations"

    # settings.py: the one line that gives it to an agent
    OMNI_AGENTS["smart"]["tools"].append("count_threads")

A handler gets the model's ``args`` and the turn's :class:`Caller`, and runs
as that caller: whatever the model asks for, it only ever sees and changes
``caller.resource_id``'s threads (the built-in tools look every thread up
within that resource). It returns text (or an MCP result dict). A tool made
with ``needs_approval=True`` waits for a person's decision before it runs
(:mod:`chat_app.tools.options`).

External MCP servers come from a preset's ``mcp_servers`` (see
:func:`chat_app.tools.options.external_servers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

SERVER = "omni"  # the in-process MCP server's name


@dataclass(frozen=True)
class Caller:
    """Who a tool runs for: the turn's resource and thread."""

    resource_id: str
    thread_id: str
    turn_id: str
    session_id: str | None = None


@dataclass
class Tool:
    name: str
    description: str
    input_schema: dict | type
    handler: Callable[[dict, Caller], Awaitable[Any]]
    needs_approval: bool = False

    @property
    def qualified(self) -> str:
        return qualified(self.name)


def qualified(name: str, server: str = SERVER) -> str:
    """The name the model (and the CLI's permission rules) see."""
    return f"mcp__{server}__{name}"


TOOLS: dict[str, Tool] = {}


def omni_tool(name: str, description: str, input_schema: dict | type, *, needs_approval: bool = False):
    """Register a coroutine ``handler(args, caller)`` as the project's tool ``name``."""

    def register(handler):
        TOOLS[name] = Tool(name, description, input_schema, handler, needs_approval)
        return handler

    return register


_discovered = False


def discover() -> None:
    """Register the built-in tools and every installed app's ``omni_tools``
    module (as the admin finds ``admin`` modules)."""
    global _discovered
    if _discovered:
        return
    from django.utils.module_loading import autodiscover_modules

    from . import builtin  # noqa: F401  (registers the built-in tools)

    autodiscover_modules("omni_tools")
    _discovered = True


def get(name: str) -> Tool:
    discover()
    try:
        return TOOLS[name]
    except KeyError:
        raise LookupError(f"no tool {name!r} is registered (chat_app.tools.omni_tool)") from None


@dataclass
class ToolContext:
    """What one Claude client's tools and permission callbacks act for: set
    by each turn before it sends its message (a client runs one turn at a
    time; a warm client or a spare serves several turns and threads)."""

    caller: Caller | None = None
    publish: Callable[[dict], None] | None = None  # the turn's events
    approvals: set[str] = field(default_factory=set)  # qualified names needing a decision
