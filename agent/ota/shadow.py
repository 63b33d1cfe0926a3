"""Shadow evaluation's math: a new and an old model on the same live frames, judged (pure)."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import from_mapping
from agent.pipeline.detection import iou_matrix
from agent.pipeline.latency import percentile

# a frame's boxes for detection: (class, x1, y1, x2, y2) in pixels, best first
Box = tuple[int, float, float, float, float]
# latencies kept per model for the percentiles (a bounded window: probation may be long)
LATENCY_KEEP = 4096


class ShadowVerdict(str, enum.Enum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class ShadowPolicy:
    """policy.yaml's ``shadow:`` section (docs/ota.md, "Shadow evaluation").

    The resource keys (``sample_rate``, ``cpu_budget_pct``, ``timeout_s``, ``wait_max_s``)
    are the device's; a package's manifest ``shadow`` may only tighten the thresholds.
    """

    enabled: bool = True
    # share of the served frames the other model also runs on (1 = every frame)
    sample_rate: float = 0.25
    # the shadow worker's busy time as a share of one core, at most; never more than the
    # FPS cap's idle time in each period either (agent/ota/shadow_run.py)
    cpu_budget_pct: float = 25.0
    # compared frames before a verdict; a shadow period before activation runs this many
    # (0: no shadow period, the candidate goes live after the gate as before). 100, not
    # 50: a good release agreeing on 98 % of field frames fails agreement_min 0.9 on 50
    # frames by chance on ~1 device in 2000 (binomial tail), on 100 on ~1 in 180 000
    min_frames: int = 100
    before_activation_frames: int = 0
    # one shadow inference longer than this: hung (the candidate fails the check)
    timeout_s: float = 10.0
    # loading and warming the shadow model may take this long (a big model on a Pi)
    load_timeout_s: float = 120.0
    # how long a shadow period (or probation) waits for its frames before it gives up
    wait_max_s: float = 120.0
    agreement_min: float = 0.9
    confidence_drop_max: float = 0.1
    class_hist_distance_max: float = 0.2
    box_iou_min: float = 0.5
    latency_ratio_max: float = 1.5
    latency_slack_ms: float = 1.0
    error_rate_max: float = 0.02

    def check(self) -> str | None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if not math.isfinite(value) or value < 0:
                return f"{f.name}: must be a finite number >= 0, got {value}"
        for name in ("sample_rate", "agreement_min", "class_hist_distance_max", "box_iou_min"):
            if getattr(self, name) > 1:
                return f"{name}: must be at most 1, got {getattr(self, name)}"
        if self.cpu_budget_pct > 100:
            return f"cpu_budget_pct: must be at most 100, got {self.cpu_budget_pct}"
        for name in ("timeout_s", "load_timeout_s"):
            if getattr(self, name) <= 0:
                return f"{name}: must be above 0"
        return None

    @property
    def active(self) -> bool:
        return self.enabled and self.sample_rate > 0 and self.cpu_budget_pct > 0


# the thresholds a package may tighten: raised (True) or lowered (False) to be stricter
TIGHTEN_BY_RAISING: Mapping[str, bool] = {
    "min_frames": True,
    "before_activation_frames": True,
    "agreement_min": True,
    "box_iou_min": True,
    "confidence_drop_max": False,
    "class_hist_distance_max": False,
    "latency_ratio_max": False,
    "latency_slack_ms": False,
    "error_rate_max": False,
}


def shadow_policy_from_mapping(data: Any, source: str) -> ShadowPolicy:
    """The ``shadow:`` section of a policy.yaml; a bad key or value is a ConfigError."""
    if data is None:
        return ShadowPolicy()
    # from_mapping runs ShadowPolicy.check() and names the key
    return from_mapping(ShadowPolicy, data, source=f"{source}: shadow")


def tighten(
    policy: ShadowPolicy, package_shadow: Mapping[str, Any] | None
) -> tuple[ShadowPolicy, list[str]]:
    """``policy`` with a package's ``shadow`` thresholds where they are stricter; returns
    the notes on what was ignored (a loosening, an unknown key, a bad value)."""
    if not package_shadow:
        return policy, []
    notes: list[str] = []
    updates: dict[str, Any] = {}
    for key, requested in package_shadow.items():
        if key not in TIGHTEN_BY_RAISING:
            notes.append(f"{key}: not a threshold a package may set; ignored")
            continue
        if (
            isinstance(requested, bool)
            or not isinstance(requested, (int, float))
            or not math.isfinite(requested)
        ):
            notes.append(f"{key}: {requested!r} is not a finite number; ignored")
            continue
        device = getattr(policy, key)
        stricter = requested >= device if TIGHTEN_BY_RAISING[key] else requested <= device
        if not stricter:
            notes.append(f"{key}: {requested} would loosen the device's {device}; ignored")
            continue
        updates[key] = type(device)(requested)
    tightened = dataclasses.replace(policy, **updates)
    problem = tightened.check()
    if problem:
        bad = problem.split(":", 1)[0]
        notes.append(f"{problem}; ignored")
        updates.pop(bad, None)
        tightened = dataclasses.replace(policy, **updates)
    return tightened, notes


@dataclass(frozen=True)
class FrameOutcome:
    """One model's result on one frame: what the daemon reports per frame."""

    top_class: int
    confidence: float
    latency_ms: float
    boxes: tuple[Box, ...] = ()


def box_agreement(new: Sequence[Box], old: Sequence[Box]) -> float:
    """How well two frames' boxes agree (0..1): greedy one-to-one matching of same-class
    boxes by IoU, the matched IoUs summed over the larger box count; no boxes on either
    side is full agreement, boxes on one side only is none."""
    if not new and not old:
        return 1.0
    if not new or not old:
        return 0.0
    iou = iou_matrix(
        np.asarray([box[1:] for box in new], dtype=np.float64),
        np.asarray([box[1:] for box in old], dtype=np.float64),
    ).astype(np.float64)
    same = np.asarray([[bn[0] == bo[0] for bo in old] for bn in new])
    iou = np.where(same, iou, 0.0)
    total = 0.0
    while iou.size and iou.max() > 0:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        total += float(iou[i, j])
        iou[i, :] = 0.0
        iou[:, j] = 0.0
    return total / max(len(new), len(old))


def histogram_distance(a: Mapping[int, int], b: Mapping[int, int]) -> float:
    """Total variation distance (0..1) between two class histograms (counts)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    if total_a == 0 or total_b == 0:
        return 0.0
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0) / total_a - b.get(k, 0) / total_b) for k in keys)


def _percentile(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


@dataclass
class ShadowTally:
    """The pairs seen so far (fed by one thread under its owner's lock)."""

    frames: int = 0
    agree: int = 0
    new_conf_sum: float = 0.0
    old_conf_sum: float = 0.0
    box_agreement_sum: float = 0.0
    detection: bool = False
    new_errors: int = 0
    old_errors: int = 0
    new_hist: dict[int, int] = field(default_factory=dict)
    old_hist: dict[int, int] = field(default_factory=dict)
    new_latency_ms: list[float] = field(default_factory=list)
    old_latency_ms: list[float] = field(default_factory=list)
    # frames the shadow could not take (worker busy, over its CPU budget, no idle time)
    dropped: int = 0
    # set once: the shadow cannot go on (hung, the worker failed); the check fails
    failure: str = ""

    def record(self, new: FrameOutcome, old: FrameOutcome) -> None:
        self.frames += 1
        self.agree += new.top_class == old.top_class
        self.new_conf_sum += new.confidence
        self.old_conf_sum += old.confidence
        self.new_hist[new.top_class] = self.new_hist.get(new.top_class, 0) + 1
        self.old_hist[old.top_class] = self.old_hist.get(old.top_class, 0) + 1
        if self.detection:
            self.box_agreement_sum += box_agreement(new.boxes, old.boxes)
        for keep, value in (
            (self.new_latency_ms, new.latency_ms),
            (self.old_latency_ms, old.latency_ms),
        ):
            keep.append(value)
            if len(keep) > LATENCY_KEEP:
                del keep[: len(keep) - LATENCY_KEEP]

    def record_error(self, new_side: bool) -> None:
        if new_side:
            self.new_errors += 1
        else:
            self.old_errors += 1

    def fail(self, reason: str) -> None:
        self.failure = self.failure or reason


@dataclass(frozen=True)
class ShadowResult:
    verdict: ShadowVerdict
    reason: str
    # the shared contract's names (docs/CONTRACTS.md): journal detail["quality"]
    quality: Mapping[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reason": self.reason, "quality": dict(self.quality)}


def shadow_figures(tally: ShadowTally) -> dict[str, float]:
    """The figures of a tally under the shared contract's names; absent ones left out."""
    out: dict[str, float] = {"shadow_frames": float(tally.frames)}
    attempts = tally.frames + tally.new_errors
    if attempts:
        out["shadow_new_error_rate"] = tally.new_errors / attempts
    if tally.dropped:
        out["shadow_dropped"] = float(tally.dropped)
    if not tally.frames:
        return out
    n = tally.frames
    out["shadow_agreement"] = tally.agree / n
    out["confidence_delta"] = (tally.new_conf_sum - tally.old_conf_sum) / n
    out["class_hist_distance"] = histogram_distance(tally.new_hist, tally.old_hist)
    if tally.detection:
        out["shadow_box_agreement"] = tally.box_agreement_sum / n
    for name, values in (("new", tally.new_latency_ms), ("old", tally.old_latency_ms)):
        p50 = _percentile(values, 50)
        if p50 is not None:
            out[f"shadow_{name}_latency_p50_ms"] = p50
    return out


def judge_shadow(policy: ShadowPolicy, tally: ShadowTally, need_frames: int = 0) -> ShadowResult:
    """The verdict on a tally: FAILED at the first broken threshold (figures in the reason),
    PENDING until ``need_frames`` (default ``policy.min_frames``) pairs were compared."""
    figures = shadow_figures(tally)
    need = need_frames or policy.min_frames
    n = tally.frames

    def result(verdict: ShadowVerdict, reason: str) -> ShadowResult:
        return ShadowResult(verdict, reason, figures)

    if tally.failure:
        return result(ShadowVerdict.FAILED, f"shadow check failed: {tally.failure}")
    attempts = n + tally.new_errors
    # errors count once a few frames are in, so one early error is a rate, not 100 %
    if attempts and tally.new_errors and attempts >= min(need, 20):
        rate = tally.new_errors / attempts
        if rate > policy.error_rate_max:
            return result(
                ShadowVerdict.FAILED,
                f"shadow check failed: the new model failed on {tally.new_errors} of "
                f"{attempts} shadow frames ({rate:.1%}, {policy.error_rate_max:.1%} allowed)",
            )
    if n < max(1, need):
        return result(ShadowVerdict.PENDING, f"{n}/{need} shadow frames")
    summary = summarize(figures)
    checks: list[tuple[bool, str]] = [
        (
            figures["shadow_agreement"] < policy.agreement_min,
            f"top-1 agreement {figures['shadow_agreement']:.3f} under {policy.agreement_min:g}",
        ),
        (
            figures["confidence_delta"] < -policy.confidence_drop_max,
            f"mean confidence fell by {-figures['confidence_delta']:.3f} (at most "
            f"{policy.confidence_drop_max:g})",
        ),
        (
            figures["class_hist_distance"] > policy.class_hist_distance_max,
            f"class-histogram distance {figures['class_hist_distance']:.3f} over "
            f"{policy.class_hist_distance_max:g}",
        ),
    ]
    if tally.detection:
        checks.append(
            (
                figures["shadow_box_agreement"] < policy.box_iou_min,
                f"box agreement (mean IoU) {figures['shadow_box_agreement']:.3f} under "
                f"{policy.box_iou_min:g}",
            )
        )
    new_p50 = figures.get("shadow_new_latency_p50_ms")
    old_p50 = figures.get("shadow_old_latency_p50_ms")
    if new_p50 is not None and old_p50 is not None:
        limit = policy.latency_ratio_max * old_p50 + policy.latency_slack_ms
        checks.append(
            (
                new_p50 > limit,
                f"latency p50 {new_p50:.2f} ms over {limit:.2f} ms (old model {old_p50:.2f} ms)",
            )
        )
    broken = [why for failed, why in checks if failed]
    if broken:
        return result(ShadowVerdict.FAILED, f"shadow check failed: {'; '.join(broken)} ({summary})")
    return result(ShadowVerdict.PASSED, f"shadow check passed ({summary})")


def summarize(figures: Mapping[str, float]) -> str:
    """The figures in one line for reasons, logs and `edge-agent status`."""
    parts = [f"{int(figures.get('shadow_frames', 0))} frames"]
    labels = (
        ("shadow_agreement", "agreement {:.3f}"),
        ("confidence_delta", "confidence delta {:+.3f}"),
        ("class_hist_distance", "class-hist distance {:.3f}"),
        ("shadow_box_agreement", "box agreement {:.3f}"),
        ("shadow_new_latency_p50_ms", "latency p50 new {:.2f} ms"),
        ("shadow_old_latency_p50_ms", "old {:.2f} ms"),
        ("shadow_dropped", "{:.0f} dropped"),
    )
    for key, fmt in labels:
        if key in figures:
            parts.append(fmt.format(figures[key]))
    return ", ".join(parts)
