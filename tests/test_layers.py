"""Imports point down only (issue 14, item 15): the layers of the project, so
that new work (tools, usage) lands in a module of its own without circles.

    omni (settings, asgi, urls, api, health)          top: wires everything
    chat_app: api, consumers, views  (transports)
              lifecycle, receivers
              streams
              turns: start > admission > registry > runner > store, states, buffer
              pool > sdk;  leases, limits, events, models
    sessions_app                                       bottom: no chat_app, no omni
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine_agnostic

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), also inside functions."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "migrations" not in p.parts]


def offending(paths, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(m for m in imports_of(path)
                     if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def chat(*names: str) -> list[Path]:
    return [ROOT / "chat_app" / name for name in names]


ABOVE_TURNS = ("chat_app.streams", "chat_app.lifecycle", "chat_app.receivers",
               "chat_app.consumers", "chat_app.api", "chat_app.views")


def test_sessions_app_is_the_bottom_layer():
    assert offending(modules("sessions_app"), ("chat_app", "omni")) == {}


def test_the_turn_pipelines_low_modules_import_nothing_above_them():
    low = chat("events.py", "leases.py", "sdk.py", "pool.py", "models.py", "offline_model.py")
    low += modules("chat_app/limits")
    assert offending(low, ("chat_app.turns",) + ABOVE_TURNS) == {}


def test_the_turn_package_points_down():
    turns = ROOT / "chat_app" / "turns"
    assert offending(modules("chat_app/turns"), ABOVE_TURNS) == {}
    order = ["buffer", "states", "store", "runner", "registry", "admission", "start"]
    for i, name in enumerate(order):
        above = tuple(f"chat_app.turns.{higher}" for higher in order[i + 1:])
        if name == "store":  # beside the runner, which uses it
            above = ("chat_app.turns.runner",) + above
        assert offending([turns / f"{name}.py"], above) == {}, name


def test_chat_app_reads_and_writes_threads_through_sessions_app_services():
    """No chat_app module touches sessions_app's models: reads go through
    ``sessions_app.selectors``, writes through its services (``services``,
    ``toolcalls``, ``usage``)."""
    assert offending(modules("chat_app"), ("sessions_app.models",)) == {}


def test_streams_sits_below_the_transports_and_the_lifecycle():
    assert offending(chat("streams.py"), ("chat_app.lifecycle", "chat_app.receivers",
                                          "chat_app.consumers", "chat_app.api")) == {}
