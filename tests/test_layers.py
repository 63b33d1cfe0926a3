"""The layers: which parts of the agent may not import which, checked on every import statement.

Also catches imports hidden in strings (importlib.import_module("agent.daemon")), which is
how the OTA service once reached into the daemon without grep seeing it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[1] / "agent"


@dataclass(frozen=True)
class Layer:
    id: str
    part: str  # a folder under agent/
    forbidden: tuple[str, ...]  # module prefixes it must not import
    why: str
    allowed: tuple[str, ...] = ()  # exceptions, each with its reason in the row's comment


LAYERS = [
    Layer("ota-not-daemon", "ota", ("agent.daemon",), "OTA reaches the daemon only via ModelHost"),
    Layer(
        "pipeline-below-ota",
        "pipeline",
        ("agent.ota", "agent.daemon", "agent.fleet", "agent.commands"),
        "the frame pipeline is used by OTA and the daemon, never the reverse",
        # the kill-point hook (a no-op unless a fault test arms it) marks the model load
        allowed=("agent.ota.killpoint",),
    ),
    Layer(
        "runtime-at-the-bottom",
        "runtime",
        ("agent.ota", "agent.daemon", "agent.fleet", "agent.pipeline", "agent.commands"),
        "a backend knows nothing of what runs it",
        # the one percentile definition (pure math on floats; imports only the stdlib)
        allowed=("agent.pipeline.latency",),
    ),
    Layer(
        "package-below-ota",
        "package",
        ("agent.ota", "agent.daemon", "agent.fleet", "agent.commands"),
        "the package format is shared by the device and the operator",
    ),
    Layer(
        "fleet-not-device",
        "fleet",
        ("agent.daemon", "agent.commands"),
        "the operator's server never runs the device's daemon",
    ),
    Layer(
        "telemetry-not-ota",
        "telemetry",
        ("agent.ota", "agent.daemon", "agent.fleet", "agent.commands"),
        "telemetry records what others tell it",
    ),
    Layer(
        "daemon-not-cli",
        "daemon",
        ("agent.commands", "agent.cli"),
        "the CLI starts the daemon, not the reverse",
    ),
]


def imported_names(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module name `path` imports, with its line (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names.append((node.lineno, base))
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("agent.")
            and " " not in node.value
        ):
            names.append((node.lineno, node.value))
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(layer: Layer, root: Path = AGENT) -> list[str]:
    found = []
    for path in sorted((root / layer.part).rglob("*.py")):
        for line, name in imported_names(path, root):
            if _under(name, layer.forbidden) and not _under(name, layer.allowed):
                found.append(f"{path.relative_to(root.parent)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.id)
def test_a_part_does_not_import_what_sits_above_it(layer: Layer) -> None:
    assert (AGENT / layer.part).is_dir(), f"agent/{layer.part} is gone: update the table"
    found = violations(layer)
    assert not found, f"{layer.why}: " + "; ".join(found)


def test_the_check_sees_plain_relative_and_string_imports(tmp_path: Path) -> None:
    (tmp_path / "agent" / "ota").mkdir(parents=True)
    fake = tmp_path / "agent" / "ota" / "probe.py"
    fake.write_text(
        "import agent.daemon\n"
        "from ..daemon import wiring\n"
        "import importlib\n"
        "m = importlib.import_module('agent.daemon.wiring')\n",
        encoding="utf-8",
    )
    found = violations(LAYERS[0], tmp_path / "agent")
    assert [f.split(" imports ")[1] for f in found] == [
        "agent.daemon",
        "agent.daemon",
        "agent.daemon.wiring",
        "agent.daemon.wiring",
    ], found
