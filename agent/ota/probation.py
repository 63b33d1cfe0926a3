"""Probation after activation: errors, latency vs the old model, confidence, boxes; crash loops."""

from __future__ import annotations

import dataclasses
import enum
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.ota.host import LiveLatency
from agent.pipeline.latency import percentile


class Verdict(str, enum.Enum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class ProbationPolicy:
    """When a freshly activated model is trusted (both frames and time) or thrown out.

    Latency (docs/ota.md, "Probation statistics"): the new model's frames are cut into
    windows of ``latency_window_frames``; a window breaches when its median is over
    ``latency_ratio_max`` x the old model's median + ``latency_slack_ms``; probation fails
    on latency only after ``latency_breach_windows`` breaching windows in a row. A median
    shrugs off the scheduler's spikes on a busy board, and a streak of windows shrugs off
    a busy minute; a truly slower model breaches every window.
    """

    min_frames: int = 200
    min_s: float = 60.0
    max_error_rate: float = 0.02
    # Errors alone end probation early: this many in a row is a broken model.
    max_consecutive_errors: int = 5
    latency_window_frames: int = 50
    latency_ratio_max: float = 1.5
    latency_slack_ms: float = 1.0
    latency_breach_windows: int = 3
    # A latency-only failure is not a permanent refusal (it may rest on a noisy machine);
    # this many of them for one release are.
    latency_failures_max: int = 3
    # The new model's mean confidence on live frames may sit at most this far under the
    # old model's (live in the same loop before the swap, else the gate's golden-set
    # figure; without either, the candidate's own golden-set figure): a collapsed
    # softmax fails.
    confidence_mean_drop_max: float = 0.15
    # Detectors (docs/ota.md, "Probation of a detector"): live boxes per frame and mean box
    # score against what the gate saw the new model do on the golden set. Only a collapse
    # fails (live frames need not look like the golden set): fewer than this share of the
    # gate's boxes per frame, or a mean score under this share of the gate's.
    boxes_per_frame_ratio_min: float = 0.25
    box_score_ratio_min: float = 0.5
    # the old model's live confidence counts only over at least this many frames
    confidence_min_samples: int = 50


@dataclass(frozen=True)
class Baseline:
    """What the new model is held to: the old model's latency (measured live in the same
    loop just before the swap, else by the gate), the gate's candidate confidence and the
    old model's confidence (live, else the gate's)."""

    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_samples: int = 0
    # "live" (the old model in the daemon's own loop), "gate" (the gate's run of the old
    # model, a fallback without a daemon) or "" (no latency check)
    latency_source: str = ""
    # the candidate's mean top-1 confidence on the golden set (the gate's run)
    confidence_mean: float | None = None
    # a detector's boxes per golden frame and mean box score in the gate (the new model)
    boxes_per_frame: float | None = None
    box_score_mean: float | None = None
    # the old model's mean confidence: "live" (this loop, before the swap) or "gate"
    old_confidence_mean: float | None = None
    old_confidence_source: str = ""

    @classmethod
    def from_gate_report(cls, report: Mapping[str, Any] | None) -> Baseline:
        """The baseline in a journal row (``probation_baseline``) or a gate report dict.

        A gate report gives the old model's latency (``metrics.latency.baseline``) and the
        candidate's mean confidence; a missing figure just turns that check off.
        """
        if not report:
            return cls()
        saved = report.get("probation_baseline")
        if isinstance(saved, Mapping) and saved:
            p50 = _num(saved.get("latency_p50_ms"))
            return cls(
                latency_p50_ms=p50,
                latency_p95_ms=_num(saved.get("latency_p95_ms")),
                latency_samples=int(_num(saved.get("latency_samples")) or 0),
                latency_source=str(saved.get("latency_source") or ("gate" if p50 else "")),
                confidence_mean=_num(saved.get("confidence_mean")),
                boxes_per_frame=_num(saved.get("boxes_per_frame")),
                box_score_mean=_num(saved.get("box_score_mean")),
                old_confidence_mean=_num(saved.get("old_confidence_mean")),
                old_confidence_source=str(saved.get("old_confidence_source") or ""),
            )
        metrics = report.get("metrics") or {}
        latency = metrics.get("latency") if isinstance(metrics, Mapping) else None
        old = latency.get("baseline") if isinstance(latency, Mapping) else None
        p50 = _num(old.get("p50_ms")) if isinstance(old, Mapping) else None
        p95 = _num(old.get("p95_ms")) if isinstance(old, Mapping) else None
        # The gate's per-model metrics: a classifier's mean top-1 probability, a
        # detector's mean best-box score (what the daemon reports per frame for each).
        old_conf = _gate_confidence(metrics, "baseline")
        # a detection gate's figures for the new model on the golden set
        det = metrics.get("candidate") if isinstance(metrics, Mapping) else None
        if not isinstance(det, Mapping) or metrics.get("task") != "detection":
            det = {}
        return cls(
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_source="gate" if p50 is not None else "",
            confidence_mean=_gate_confidence(metrics, "candidate"),
            old_confidence_mean=old_conf,
            old_confidence_source="gate" if old_conf is not None else "",
            boxes_per_frame=_num(det.get("boxes_per_image")),
            box_score_mean=_num(det.get("box_score_mean")),
        )

    def with_live(self, live: LiveLatency, min_samples: int) -> Baseline:
        """This baseline with the old model's live latency, when it ran enough frames."""
        if live.p50_ms is None or live.samples < max(1, min_samples):
            return self
        return dataclasses.replace(
            self,
            latency_p50_ms=live.p50_ms,
            latency_p95_ms=live.p95_ms,
            latency_samples=live.samples,
            latency_source="live",
        )

    def with_live_confidence(self, mean: float | None, samples: int, min_samples: int) -> Baseline:
        """This baseline with the old model's live mean confidence over enough frames."""
        if mean is None or samples < max(1, min_samples):
            return self
        return dataclasses.replace(self, old_confidence_mean=mean, old_confidence_source="live")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gate_confidence(metrics: Any, role: str) -> float | None:
    model = metrics.get(role) if isinstance(metrics, Mapping) else None
    if not isinstance(model, Mapping):
        return None
    conf = _num(model.get("confidence_mean"))
    return conf if conf is not None else _num(model.get("top_score_mean"))


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
    latency_p50_ms: float | None = None
    # FAILED on latency alone: a verdict that may rest on a noisy machine (no refusal)
    latency_only: bool = False
    # a detector's live figures (None: no frame reported boxes)
    boxes_per_frame: float | None = None
    box_score_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "frames": self.frames,
            "errors": self.errors,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "confidence_mean": self.confidence_mean,
            "latency_only": self.latency_only,
            "boxes_per_frame": self.boxes_per_frame,
            "box_score_mean": self.box_score_mean,
        }


class ProbationWatch:
    """Collects per-frame outcomes of the new model and judges them (pure; the caller passes
    a monotonic clock reading, so a wall-clock jump neither freezes nor ends probation)."""

    def __init__(self, policy: ProbationPolicy, baseline: Baseline, started_s: float) -> None:
        self.policy = policy
        self.baseline = baseline
        self.started_s = started_s
        self._latencies_ms: list[float] = []
        self._confidences: list[float] = []
        self._errors = 0
        self._consecutive_errors = 0
        self._window: list[float] = []
        self.window_medians_ms: list[float] = []
        self._breaches = 0
        self.boxes = BoxTally()

    @property
    def frames(self) -> int:
        return len(self._latencies_ms) + self._errors

    def latency_limit_ms(self) -> float | None:
        """The median a window may reach (None: no baseline, latency not judged)."""
        base = self.baseline.latency_p50_ms
        if base is None:
            return None
        return self.policy.latency_ratio_max * base + self.policy.latency_slack_ms

    def observe(
        self, latency_s: float, confidence: float, box_scores: Sequence[float] | None = None
    ) -> None:
        """One frame: its latency, confidence and, for a detector, its boxes' scores."""
        if box_scores is not None:
            self.boxes.add(box_scores)
        ms = latency_s * 1000.0
        self._latencies_ms.append(ms)
        self._confidences.append(confidence)
        self._consecutive_errors = 0
        window = self._window
        window.append(ms)
        if len(window) >= max(1, self.policy.latency_window_frames):
            median = statistics.median(window)
            window.clear()
            self.window_medians_ms.append(median)
            limit = self.latency_limit_ms()
            self._breaches = self._breaches + 1 if limit is not None and median > limit else 0

    def observe_error(self) -> None:
        self._errors += 1
        self._consecutive_errors += 1

    def judge(self, now_s: float) -> ProbationResult:
        p = self.policy
        frames = self.frames
        lat = self._latencies_ms
        p50 = percentile(lat, 50.0) if lat else None
        p95 = percentile(lat, 95.0) if lat else None
        conf = float(np.mean(self._confidences)) if self._confidences else None

        def result(verdict: Verdict, reason: str, latency_only: bool = False) -> ProbationResult:
            return ProbationResult(
                verdict,
                reason,
                frames,
                self._errors,
                p95,
                conf,
                p50,
                latency_only,
                self.boxes.per_frame(),
                self.boxes.score_mean(),
            )

        if self._consecutive_errors >= p.max_consecutive_errors:
            return result(Verdict.FAILED, f"{self._consecutive_errors} inference errors in a row")
        limit = self.latency_limit_ms()
        if limit is not None and self._breaches >= p.latency_breach_windows:
            base = self.baseline
            return result(
                Verdict.FAILED,
                f"latency median {self.window_medians_ms[-1]:.2f} ms over the {limit:.2f} ms "
                f"limit in {self._breaches} windows of {p.latency_window_frames} frames in a "
                f"row (old model {base.latency_p50_ms:.2f} ms, {base.latency_source})",
                latency_only=True,
            )
        if frames < p.min_frames or now_s - self.started_s < p.min_s:
            return result(Verdict.PENDING, f"{frames}/{p.min_frames} frames")
        if self._breaches:
            # a streak is under way: wait until it either completes or breaks
            return result(
                Verdict.PENDING,
                f"latency over the limit in {self._breaches} window(s) in a row; watching",
            )
        rate = self._errors / frames
        if rate > p.max_error_rate:
            return result(
                Verdict.FAILED, f"error rate {rate:.1%} over the {p.max_error_rate:.1%} allowed"
            )
        floor = self.confidence_floor()
        if conf is not None and floor is not None and conf < floor:
            return result(
                Verdict.FAILED,
                f"mean confidence {conf:.3f} on {len(self._confidences)} live frames under "
                f"the {floor:.3f} floor ({self._confidence_basis()})",
            )
        collapse = box_collapse(p, self.baseline, self.boxes)
        if collapse:
            return result(Verdict.FAILED, collapse)
        per_frame, score = self.boxes.per_frame(), self.boxes.score_mean()
        if per_frame is not None:
            boxes = f"{per_frame:.2f} boxes a frame"
            if score is not None:
                boxes += f", mean box score {score:.3f}"
            return result(Verdict.PASSED, f"{frames} frames healthy, {boxes}")
        return result(Verdict.PASSED, f"{frames} frames healthy")

    def confidence_floor(self) -> float | None:
        """The mean confidence the new model must keep (None: no figure to hold it to).

        Held to the old model's (live frames differ from the golden set for both models
        alike, so a harder scene does not fail a good candidate); without one, to its own
        golden-set figure. A detector (the baseline has the gate's box figures) is judged
        by box_collapse instead: its per-frame "confidence" is the best box's score, which
        moves with how many objects a scene holds, so only a collapse there means a fault."""
        base = self.baseline
        if base.boxes_per_frame is not None:
            return None
        ref = base.old_confidence_mean
        if ref is None:
            ref = base.confidence_mean
        return None if ref is None else ref - self.policy.confidence_mean_drop_max

    def _confidence_basis(self) -> str:
        base = self.baseline
        if base.old_confidence_mean is not None:
            basis = f"old model {base.old_confidence_mean:.3f} ({base.old_confidence_source})"
        else:
            basis = f"this model {base.confidence_mean or 0.0:.3f} on the golden set"
        if base.confidence_mean is not None and base.old_confidence_mean is not None:
            basis += f"; the gate saw {base.confidence_mean:.3f} for this model"
        return f"{basis}, minus {self.policy.confidence_mean_drop_max:g}"


class BoxTally:
    """A detector's boxes over the frames of probation: count and score sum."""

    def __init__(self) -> None:
        self.frames = 0
        self.count = 0
        self.score_sum = 0.0

    def add(self, scores: Sequence[float]) -> None:
        self.frames += 1
        self.count += len(scores)
        self.score_sum += float(sum(scores))

    def per_frame(self) -> float | None:
        return self.count / self.frames if self.frames else None

    def score_mean(self) -> float | None:
        return self.score_sum / self.count if self.count else None


def box_collapse(policy: ProbationPolicy, baseline: Baseline, boxes: BoxTally) -> str | None:
    """Why a detector's live boxes collapsed against the gate's golden-set figures (None
    when they did not, or when there is nothing to compare): no or far fewer boxes per
    frame, or scores sunk towards the threshold."""
    per_frame = boxes.per_frame()
    if per_frame is None:
        return None
    gate_boxes = baseline.boxes_per_frame
    if gate_boxes is not None and gate_boxes > 0:
        floor = policy.boxes_per_frame_ratio_min * gate_boxes
        if per_frame < floor:
            return (
                f"boxes per frame {per_frame:.2f} under {floor:.2f} over {boxes.frames} frames "
                f"({policy.boxes_per_frame_ratio_min:g} x the gate's {gate_boxes:.2f} on the "
                "golden set)"
            )
    score, gate_score = boxes.score_mean(), baseline.box_score_mean
    if score is not None and gate_score is not None and gate_score > 0:
        floor = policy.box_score_ratio_min * gate_score
        if score < floor:
            return (
                f"mean box score {score:.3f} under {floor:.3f} over {boxes.count} boxes "
                f"({policy.box_score_ratio_min:g} x the gate's {gate_score:.3f} on the golden set)"
            )
    return None


def crash_loop_tripped(restarts_in_probation: int, limit: int) -> bool:
    """True when the agent restarted ``limit`` times while the new model was on probation."""
    return limit > 0 and restarts_in_probation >= limit
