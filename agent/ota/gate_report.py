"""The gate's report: one GateCheck per guard rail, the GateReport (JSON and table) and
its smallest margin."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.ota.gate_data import GateModel, GoldenSet
from agent.ota.gate_frames import PIPELINE_CHECK
from agent.ota.gate_policy import GatePolicy, PolicyChange
from agent.textio import format_table


@dataclass(frozen=True)
class GateCheck:
    """One guard rail: the measured value, the threshold it is held to, and the verdict."""

    name: str
    verdict: str  # "pass", "fail" or "skip"
    value: float | None
    threshold: float | None
    comparison: str  # ">=" or "<=": value must be ... threshold
    detail: str

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GateReport:
    """Everything the gate measured and decided; ``to_dict()`` is the JSON report."""

    passed: bool
    checks: list[GateCheck]
    metrics: dict[str, Any]
    policy: dict[str, float]
    policy_changes: list[PolicyChange]
    models: dict[str, Any]
    golden: dict[str, Any]
    baseline_cache: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.failed]

    @property
    def ignored_policy_changes(self) -> list[PolicyChange]:
        return [c for c in self.policy_changes if not c.applied]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": "pass" if self.passed else "fail",
            "failed": [c.name for c in self.failed_checks],
            "checks": [c.to_dict() for c in self.checks],
            "policy": self.policy,
            "policy_changes": [c.to_dict() for c in self.policy_changes],
            "models": self.models,
            "golden": self.golden,
            "baseline_cache": self.baseline_cache,
            "metrics": self.metrics,
            "elapsed_s": self.elapsed_s,
            **self._margin(),
        }

    def _margin(self) -> dict[str, Any]:
        """``margin``: the check nearest to failing and by how much it passed (own units)."""
        found = smallest_margin(self.checks) if self.passed else None
        return {"margin": {"check": found[0], "value": found[1]}} if found else {}

    def format_table(self) -> str:
        """The readable summary for stdout and the log: one row per check, failures named."""
        rows = [
            [
                c.name,
                _fmt(c.value),
                f"{c.comparison} {_fmt(c.threshold)}",
                c.verdict.upper(),
                c.detail,
            ]
            for c in self.checks
        ]
        lines = [format_table(["check", "value", "threshold", "verdict", "detail"], rows)]
        for change in self.ignored_policy_changes:
            lines.append(f"package gate {change.key}={change.requested!r} ignored: {change.reason}")
        failed = self.failed_checks
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(c.detail for c in failed)
        lines.append(f"gate {verdict}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if "." in f"{value:.4f}" else str(value)


def smallest_margin(checks: Sequence[GateCheck]) -> tuple[str, float] | None:
    """The check nearest to failing and its margin to the threshold, in that check's own
    units (positive: passing by that much). Checks are compared by margin relative to the
    threshold so that milliseconds, MB and pp can be ranked; skipped checks and the
    pipeline check (a count of failed frames) do not count."""
    best: tuple[float, str, float] | None = None
    for c in checks:
        if c.verdict == "skip" or c.name == PIPELINE_CHECK:
            continue
        if c.value is None or c.threshold is None:
            continue
        margin = c.value - c.threshold if c.comparison == ">=" else c.threshold - c.value
        if margin < 0:
            continue  # passed by its alternative rule (agreement: the softmax MSE)
        relative = margin / max(abs(c.threshold), 1e-9)
        if best is None or relative < best[0]:
            best = (relative, c.name, float(margin))
    return None if best is None else (best[1], best[2])


def pipeline_refused_report(
    golden: GoldenSet,
    policy: GatePolicy,
    changes: list[PolicyChange],
    base_model: GateModel,
    cand_model: GateModel,
    reason: str,
    failed_rows: int,
    started: float,
) -> GateReport:
    """The report of a candidate whose preprocess, model or postprocess does not work on
    the golden frames: one failed ``pipeline`` check naming why; nothing else is judged."""
    check = GateCheck(
        PIPELINE_CHECK,
        "fail",
        float(failed_rows),
        0.0,
        "<=",
        f"{failed_rows} of {golden.rows} golden frames failed: {reason}",
    )
    return GateReport(
        passed=False,
        checks=[check],
        metrics={"task": golden.task, "pipeline": {"failed_rows": failed_rows, "reason": reason}},
        policy=policy.to_dict(),
        policy_changes=changes,
        models={
            "baseline": {"model": str(base_model.model_path), "label": base_model.label},
            "candidate": {"model": str(cand_model.model_path), "label": cand_model.label},
        },
        golden=golden.describe(),
        elapsed_s=time.perf_counter() - started,
    )
