"""A preset's tools as ``ClaudeAgentOptions``: MCP servers, the tools that run
without asking, and the permission hooks that make the rest wait for a person.

**Why a deferred call, and not a permission callback that waits.** The CLI's
``can_use_tool`` callback waits as long as the server likes, but only while
the CLI process lives: a person thinking for ten minutes would hold a Claude
process (and a slot of the process budget) all that time, and the pending
call would die with the worker. Instead, a tool that needs approval is
*deferred*: the ``PreToolUse`` hook below answers ``defer`` (after storing
the call, :mod:`sessions_app.toolcalls`), the CLI ends the turn with the call in
``ResultMessage.deferred_tool_use``, and its process is closed. The decision
is stored when a person makes it, on any worker; the conversation then
continues by resuming the session, on which the CLI asks ``can_use_tool``
for the same call again, and that callback answers from the stored decision
(allowing an allowed call exactly once). Nothing waits in memory, so the
call survives restarts; nothing runs that nobody allowed (anything unknown,
failed or raised is a deny).

External MCP servers: a preset's ``mcp_servers`` maps a server name to
``{"command", "args", "env", "tools", "approval"}`` (stdio) or
``{"type": "http", "url", "headers", "tools", "approval"}``. ``tools`` lists
the server's tools the agent may use, ``approval`` those of them that need a
person's decision. A stdio server starts with an empty environment plus
``PATH`` and exactly the ``env`` given (``env -i``): nothing of the server's
(or the CLI's) environment reaches it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from asgiref.sync import sync_to_async
from claude_agent_sdk import (
    HookMatcher,
    PermissionResultAllow,
    PermissionResultDeny,
    create_sdk_mcp_server,
    tool,
)

from omni import logs

from sessions_app import toolcalls as calls

from . import SERVER, Caller, Tool, ToolContext, get, qualified

log = logging.getLogger("omni.chat")

DEFER = {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "defer"}}


def _deny_hook(reason: str) -> dict:
    return {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                   "permissionDecisionReason": reason}}


def _result(out) -> dict:
    if isinstance(out, dict) and "content" in out:
        return out
    text = out if isinstance(out, str) else json.dumps(out, default=str)
    return {"content": [{"type": "text", "text": text}]}


def _sdk_tool(spec: Tool, context: ToolContext):
    async def run(args):
        caller = context.caller
        if caller is None:  # no turn runs on this client: fail closed
            return {"content": [{"type": "text", "text": "no conversation is running"}], "is_error": True}
        logs.bind_caller(caller)
        try:
            return _result(await spec.handler(args or {}, caller))
        except Exception:
            log.exception("[CHAT] Tool %s failed (turn %s)", spec.name, caller.turn_id)
            return {"content": [{"type": "text", "text": f"the tool {spec.name} failed on the server"}],
                    "is_error": True}

    return tool(spec.name, spec.description, spec.input_schema)(run)


def external_servers(preset: dict) -> dict[str, dict]:
    """The preset's external MCP servers as the SDK's configs."""
    out = {}
    for name, config in (preset.get("mcp_servers") or {}).items():
        kind = config.get("type", "stdio")
        if kind == "stdio":
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(config.get("env") or {})}
            out[name] = {
                "type": "stdio",
                "command": shutil.which("env") or "/usr/bin/env",
                "args": ["-i", *(f"{k}={v}" for k, v in env.items()), config["command"],
                         *config.get("args", [])],
            }
        elif kind in ("http", "sse"):
            out[name] = {"type": kind, "url": config["url"], **(
                {"headers": dict(config["headers"])} if config.get("headers") else {})}
        else:
            raise ValueError(f"mcp server {name!r}: unknown type {kind!r}")
    return out


def tool_names(preset: dict) -> tuple[list[str], set[str]]:
    """The qualified tool names a preset's agent may use, and those of them
    that need a person's decision."""
    usable, approval = [], set()
    for name in preset.get("tools", []):
        spec = get(name)
        usable.append(spec.qualified)
        if spec.needs_approval or name in preset.get("approval", ()):
            approval.add(spec.qualified)
    for server, config in (preset.get("mcp_servers") or {}).items():
        for name in config.get("tools", []):
            usable.append(qualified(name, server))
        approval.update(qualified(name, server) for name in config.get("approval", []))
    return usable, approval


def tool_options(preset: dict, context: ToolContext) -> dict:
    """Keyword arguments of ``ClaudeAgentOptions`` for ``preset``'s tools, bound
    to ``context`` (one client's: its turn sets the caller)."""
    usable, approval = tool_names(preset)
    context.approvals = approval
    servers = external_servers(preset)
    own = [get(name) for name in preset.get("tools", [])]
    if own:
        servers[SERVER] = create_sdk_mcp_server(SERVER, tools=[_sdk_tool(spec, context) for spec in own])
    options = {
        "mcp_servers": servers,
        # Run without asking: every usable tool that needs no decision.
        "allowed_tools": [name for name in usable if name not in approval],
        "can_use_tool": permission_callback(context),
    }
    if approval:
        options["hooks"] = {"PreToolUse": [HookMatcher(matcher="|".join(sorted(approval)),
                                                       hooks=[approval_hook(context)])]}
    return options


# --- the permission machinery --------------------------------------------------------

def approval_hook(context: ToolContext):
    """``PreToolUse`` for tools that need a decision: store the call as pending
    and defer it (the turn ends; see the module doc), unless it is decided."""

    async def hook(hook_input, tool_use_id, _context):
        caller: Caller | None = context.caller
        name = hook_input.get("tool_name", "")
        if caller is None or not tool_use_id:
            return _deny_hook("no conversation is running")
        logs.bind_caller(caller)
        session_id = hook_input.get("session_id") or caller.session_id
        try:
            call = await sync_to_async(calls.get_sync)(session_id, tool_use_id)
            if call is not None and call.status != call.PENDING:
                return {}  # decided: the permission callback answers from the decision
            call = await calls.open_approval(caller, session_id, tool_use_id, name,
                                             hook_input.get("tool_input") or {})
        except Exception:
            log.exception("[CHAT] Could not store the tool call %s (turn %s)", tool_use_id, caller.turn_id)
            return _deny_hook("the call could not be recorded")
        if call is None:
            return _deny_hook("the conversation was deleted")
        # The turn announces it (approval_request) once its CLI has ended the
        # turn and closed: by then the transcript holding the call is stored.
        log.info("[CHAT] Tool call %s waits for approval %s (turn %s)", name, call.approval_id, caller.turn_id)
        return DEFER

    return hook


def denial(call) -> str:
    if call is None:
        return "No one allowed this call; it was not run."
    if call.decision == "allow":
        return "This call was allowed and started once already; it is not run again."
    if call.decision == "expired":
        return "No one decided in time: the call expired and was not run."
    reason = f" ({call.decision_message})" if call.decision_message else ""
    return f"{call.decided_by or 'A person'} denied this call{reason}; it was not run."


def permission_callback(context: ToolContext):
    """``can_use_tool``: only a call a person allowed runs, and only once."""

    async def can_use_tool(name, tool_input, permission):
        caller = context.caller
        tool_use_id = permission.tool_use_id
        if caller is None or name not in context.approvals or not tool_use_id:
            return PermissionResultDeny(message="This agent may not use that tool.")
        logs.bind_caller(caller)
        try:
            session_id = caller.session_id
            allowed = await sync_to_async(calls.claim_run_sync)(session_id, tool_use_id)
            if allowed is not None:
                return PermissionResultAllow()
            call = await sync_to_async(calls.get_sync)(session_id, tool_use_id)
            await sync_to_async(calls.refuse_sync)(session_id, tool_use_id)
        except Exception:
            log.exception("[CHAT] Permission check failed for %s (turn %s)", name, caller.turn_id)
            return PermissionResultDeny(message="The call could not be checked; it was not run.")
        return PermissionResultDeny(message=denial(call))

    return can_use_tool
