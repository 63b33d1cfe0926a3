"""Probation after activation: errors, latency, confidence vs the gate baseline; crash loops."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class Verdict(str, enum.Enum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class ProbationPolicy:
    """When a freshly activated model is trusted (both frames and time) or thrown out."""

    min_frames: int = 200
    min_s: float = 60.0
    max_error_rate: float = 0.02
    # Errors alone end probation early: this many in a row is a broken model.
    max_consecutive_errors: int = 5
    latency_p95_ratio_max: float = 1.5
    latency_p95_slack_ms: float = 2.0
    confidence_mean_drop_max: float = 0.15


def probation_latency_p95_ms(gate_p95_ms: float | None, live_p95_ms: float | None) -> float | None:
    """The p95 latency probation compares the new model against.

    The gate timed the candidate alone; the live loop shares the device with everything else
    (sinks, telemetry, other processes), so its latencies run higher than the gate's. Taking
    the larger of the gate's candidate p95 and the p95 the old model had in this same loop
    just before the swap judges the new model under the load it actually runs in.
    """
    known = [v for v in (gate_p95_ms, live_p95_ms) if v is not None]
    return max(known) if known else None


@dataclass(frozen=True)
class Baseline:
    """What the gate measured for the candidate on this device (None: not measured)."""

    latency_p95_ms: float | None = None
    confidence_mean: float | None = None

    @classmethod
    def from_gate_report(cls, report: Mapping[str, Any] | None) -> Baseline:
        """Pick the candidate's p95 latency and mean confidence out of a gate report dict.

        Looks for ``baseline.latency_p95_ms`` / ``baseline.confidence_mean`` first (what
        the OTA service stores), then the gate's ``candidate`` section; a missing figure
        just turns that check off.
        """
        if not report:
            return cls()
        for section in ("probation_baseline", "candidate"):
            part = report.get(section)
            if isinstance(part, Mapping):
                lat = _num(part.get("latency_p95_ms"))
                conf = _num(part.get("confidence_mean"))
                if lat is not None or conf is not None:
                    return cls(latency_p95_ms=lat, confidence_mean=conf)
        # The gate's own layout: metrics.latency.candidate.p95_ms
        latency = (report.get("metrics") or {}).get("latency") or {}
        cand = latency.get("candidate") if isinstance(latency, Mapping) else None
        if isinstance(cand, Mapping):
            return cls(latency_p95_ms=_num(cand.get("p95_ms")))
        return cls()


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True)
class ProbationResult:
    verdict: Verdict
    reason: str
    frames: int
    errors: int
    latency_p95_ms: float | None
    confidence_mean: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "frames": self.frames,
            "errors": self.errors,
            "latency_p95_ms": self.latency_p95_ms,
            "confidence_mean": self.confidence_mean,
        }


class ProbationWatch:
    """Collects per-frame outcomes of the new model and judges them (pure; clock passed in)."""

    def __init__(self, policy: ProbationPolicy, baseline: Baseline, started_s: float) -> None:
        self.policy = policy
        self.baseline = baseline
        self.started_s = started_s
        self._latencies_ms: list[float] = []
        self._confidences: list[float] = []
        self._errors = 0
        self._consecutive_errors = 0

    @property
    def frames(self) -> int:
        return len(self._latencies_ms) + self._errors

    def observe(self, latency_s: float, confidence: float) -> None:
        self._latencies_ms.append(latency_s * 1000.0)
        self._confidences.append(confidence)
        self._consecutive_errors = 0

    def observe_error(self) -> None:
        self._errors += 1
        self._consecutive_errors += 1

    def judge(self, now_s: float) -> ProbationResult:
        p = self.policy
        frames = self.frames
        p95 = float(np.percentile(self._latencies_ms, 95)) if self._latencies_ms else None
        conf = float(np.mean(self._confidences)) if self._confidences else None

        def result(verdict: Verdict, reason: str) -> ProbationResult:
            return ProbationResult(verdict, reason, frames, self._errors, p95, conf)

        if self._consecutive_errors >= p.max_consecutive_errors:
            return result(Verdict.FAILED, f"{self._consecutive_errors} inference errors in a row")
        if frames < p.min_frames or now_s - self.started_s < p.min_s:
            return result(Verdict.PENDING, f"{frames}/{p.min_frames} frames")
        rate = self._errors / frames
        if rate > p.max_error_rate:
            return result(
                Verdict.FAILED, f"error rate {rate:.1%} over the {p.max_error_rate:.1%} allowed"
            )
        if p95 is not None and self.baseline.latency_p95_ms is not None:
            limit = p.latency_p95_ratio_max * self.baseline.latency_p95_ms + p.latency_p95_slack_ms
            if p95 > limit:
                return result(
                    Verdict.FAILED, f"latency p95 {p95:.2f} ms over the {limit:.2f} ms limit"
                )
        if conf is not None and self.baseline.confidence_mean is not None:
            floor = self.baseline.confidence_mean - p.confidence_mean_drop_max
            if conf < floor:
                return result(
                    Verdict.FAILED,
                    f"mean confidence {conf:.3f} under {floor:.3f} (gate saw "
                    f"{self.baseline.confidence_mean:.3f})",
                )
        return result(Verdict.PASSED, f"{frames} frames healthy")


def crash_loop_tripped(restarts_in_probation: int, limit: int) -> bool:
    """True when the agent restarted ``limit`` times while the new model was on probation."""
    return limit > 0 and restarts_in_probation >= limit
