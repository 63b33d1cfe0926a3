"""The gate's layout: what callers import from agent.ota.golden still resolves, and no long
functions in the gate's modules."""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import agent.ota.golden as golden

GATE_DIR = Path(golden.__file__).parent
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Moved:
    """A name callers imported from agent.ota.golden and the module that now defines it."""

    name: str
    home: str


MOVED = [
    Moved("GateCheck", "agent.ota.gate_report"),
    Moved("GateReport", "agent.ota.gate_report"),
    Moved("smallest_margin", "agent.ota.gate_report"),
    Moved("current_rss_bytes", "agent.ota.gate_measure"),
    Moved("latency_summaries_ms", "agent.ota.gate_measure"),
    Moved("backend_identity", "agent.ota.gate_measure"),
    Moved("predicted_identity", "agent.ota.gate_measure"),
    Moved("WARMUP_RUNS", "agent.ota.gate_measure"),
    Moved("LATENCY_CONFIRM_PASSES", "agent.ota.gate_measure"),
    Moved("MB", "agent.ota.gate_measure"),
    Moved("classification_checks", "agent.ota.gate_checks"),
    Moved("detection_checks", "agent.ota.gate_checks"),
    Moved("detection_gate_checks", "agent.ota.gate_checks"),
    Moved("segmentation_checks", "agent.ota.gate_checks"),
    Moved("latency_memory_checks", "agent.ota.gate_checks"),
    Moved("detection_metrics", "agent.ota.gate_checks"),
    Moved("detection_spec_of", "agent.ota.gate_checks"),
    Moved("GatePolicy", "agent.ota.gate_policy"),
    Moved("PolicyChange", "agent.ota.gate_policy"),
    Moved("load_policy", "agent.ota.gate_policy"),
]


@pytest.mark.parametrize("moved", MOVED, ids=[m.name for m in MOVED])
def test_golden_still_exports_what_moved(moved: Moved) -> None:
    home = importlib.import_module(moved.home)
    assert moved.name in golden.__all__
    assert getattr(golden, moved.name) is getattr(home, moved.name)


def test_every_name_golden_exports_exists() -> None:
    missing = [name for name in golden.__all__ if not hasattr(golden, name)]
    assert missing == []


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_gate_function_over_80_lines() -> None:
    files = [GATE_DIR / "golden.py", *sorted(GATE_DIR.glob("gate_*.py"))]
    assert len(files) > 8  # the gate's modules were found
    assert [f for path in files for f in _long_functions(path)] == []
