"""A stdio MCP server of the tests' own (the ``mcp`` package): its tools
report what the server process sees, so tests can check what a preset's
external MCP server gets from the environment."""

import json
import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("probe")


@server.tool()
def env_keys() -> str:
    """The names of this process's environment variables."""
    return json.dumps(sorted(os.environ))


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


if __name__ == "__main__":
    server.run("stdio")
