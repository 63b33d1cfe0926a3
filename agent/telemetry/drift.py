"""Drift of the live model from its golden baseline: histograms, smoothed PSI and KL, the alarm."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Confidence bins as the interval summary counts them (agent/telemetry/sampler.py): ten
# equal bins of width 0.1, bucket = min(9, int(confidence * 10)).
CONFIDENCE_BINS = 10
# Additive (Laplace) smoothing per bin: an empty bin on either side would make PSI and KL
# infinite, while one stray frame must not look like the end of the world.
SMOOTHING = 0.5
# Class ids the baseline does not know (a detector's -1, a class past the golden set's
# outputs) share one extra bin, so frames never vanish from the live side.
OTHER = "other"


def confidence_bucket(confidence: float) -> int:
    """The summary's confidence bin of one result (NaN counts in bin 0)."""
    if confidence != confidence:
        return 0
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


def smoothed(counts: Sequence[float], alpha: float = SMOOTHING) -> list[float]:
    """Counts as a distribution with ``alpha`` added to every bin (sums to 1)."""
    total = float(sum(counts)) + alpha * len(counts)
    if total <= 0:
        return [1.0 / len(counts)] * len(counts) if counts else []
    return [(float(c) + alpha) / total for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float], alpha: float = SMOOTHING) -> float:
    """Population stability index between two histograms of the same bins (smoothed):
    sum over bins of (actual - expected) * ln(actual / expected). 0 for the same shape;
    by the usual rule < 0.1 is stable, 0.1-0.25 a moderate shift, > 0.25 a large one."""
    if len(expected) != len(actual):
        raise ValueError(f"histograms of {len(expected)} and {len(actual)} bins")
    if not expected:
        return 0.0
    e, a = smoothed(expected, alpha), smoothed(actual, alpha)
    return float(sum((ai - ei) * math.log(ai / ei) for ei, ai in zip(e, a)))


def kl(expected: Sequence[float], actual: Sequence[float], alpha: float = SMOOTHING) -> float:
    """KL(actual || expected) in nats between two histograms of the same bins (smoothed)."""
    if len(expected) != len(actual):
        raise ValueError(f"histograms of {len(expected)} and {len(actual)} bins")
    if not expected:
        return 0.0
    e, a = smoothed(expected, alpha), smoothed(actual, alpha)
    return float(sum(ai * math.log(ai / ei) for ei, ai in zip(e, a)))


@dataclass(frozen=True)
class GoldenBaseline:
    """The candidate's class and confidence histograms on the golden set, computed by the
    gate and stored with the install: what its live results are compared with."""

    class_counts: tuple[int, ...]
    confidence_counts: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.class_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "class_counts": list(self.class_counts),
            "confidence_bounds": [round(i / CONFIDENCE_BINS, 1) for i in range(1, 10)],
            "confidence_counts": list(self.confidence_counts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GoldenBaseline | None:
        """The stored form back; None for anything malformed (drift is then unknown)."""
        classes, conf = data.get("class_counts"), data.get("confidence_counts")
        if not isinstance(classes, list) or not isinstance(conf, list):
            return None
        if len(conf) != CONFIDENCE_BINS or not classes:
            return None
        values = [*classes, *conf]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return None
        return cls(tuple(classes), tuple(conf))


def golden_baseline(outputs: Any) -> GoldenBaseline:
    """Histograms of a classifier's outputs ``[N, classes]``: top-1 class and its score
    as the daemon's postprocessing gives it (softmax unless the rows are probabilities)."""
    import numpy as np

    x = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    is_prob = bool(
        x.size and x.min() >= 0.0 and x.max() <= 1.0 and np.all(np.abs(x.sum(axis=1) - 1) < 1e-3)
    )
    if is_prob:
        probs = x
    else:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(probs)), top]
    class_counts = np.bincount(top, minlength=x.shape[1]).tolist()
    # confidence_bucket() for every row at once (the gate's fixed cost stays small)
    scaled = np.nan_to_num(conf * CONFIDENCE_BINS, nan=0.0)
    buckets = np.clip(scaled.astype(np.int64), 0, CONFIDENCE_BINS - 1)
    conf_counts = np.bincount(buckets, minlength=CONFIDENCE_BINS)
    return GoldenBaseline(tuple(int(v) for v in class_counts), tuple(int(v) for v in conf_counts))


@dataclass(frozen=True)
class DriftFigures:
    """Live vs golden histograms of one model over some frames."""

    frames: int
    class_psi: float
    class_kl: float
    confidence_psi: float
    confidence_kl: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "class_psi": round(self.class_psi, 6),
            "class_kl": round(self.class_kl, 6),
            "confidence_psi": round(self.confidence_psi, 6),
            "confidence_kl": round(self.confidence_kl, 6),
        }


def drift_figures(
    baseline: GoldenBaseline,
    live_class_counts: Mapping[int, int],
    live_confidence_counts: Sequence[int],
) -> DriftFigures:
    """PSI and KL of the live class and confidence histograms against the baseline. Live
    classes the baseline has no bin for go to one extra bin (empty on the golden side)."""
    known = len(baseline.class_counts)
    live = [int(live_class_counts.get(k, 0)) for k in range(known)]
    other = sum(int(v) for k, v in live_class_counts.items() if not 0 <= k < known)
    golden: list[int] = list(baseline.class_counts)
    if other:
        live.append(other)
        golden.append(0)
    conf_live = [int(v) for v in live_confidence_counts]
    return DriftFigures(
        frames=sum(live),
        class_psi=psi(golden, live),
        class_kl=kl(golden, live),
        confidence_psi=psi(baseline.confidence_counts, conf_live),
        confidence_kl=kl(baseline.confidence_counts, conf_live),
    )


@dataclass(frozen=True)
class DriftPolicy:
    """policy.yaml's ``drift:`` section: the class-histogram PSI above which the live model
    has drifted (a ``model.drift`` telemetry event), judged only on a summary with at least
    ``min_frames`` frames (a handful of frames gives a noisy PSI)."""

    psi_max: float = 0.25
    min_frames: int = 50

    def check(self) -> str | None:
        if not math.isfinite(self.psi_max) or self.psi_max <= 0:
            return f"psi_max: must be a finite number above 0, got {self.psi_max}"
        if self.min_frames < 1:
            return f"min_frames: must be at least 1, got {self.min_frames}"
        return None


class DriftAlarm:
    """Once per crossing: ``update`` is True when the PSI goes above ``psi_max`` after
    being at or below it (or on the first judged summary); it re-arms once it is back."""

    def __init__(self, over: bool = False) -> None:
        self.over = over

    def update(self, value: float, policy: DriftPolicy, frames: int) -> bool:
        if frames < policy.min_frames:
            return False
        crossed = value > policy.psi_max and not self.over
        self.over = value > policy.psi_max
        return crossed


def load_drift_policy(path: Path) -> DriftPolicy:
    """The ``drift:`` section of a policy.yaml (the defaults when the file or the section
    is missing); a bad key or value is a ConfigError naming it."""
    from agent.config import from_mapping, load_yaml_file

    if not path.is_file():
        return DriftPolicy()
    data = load_yaml_file(path)
    section = data.get("drift") if isinstance(data, dict) else None
    return from_mapping(DriftPolicy, section, source=f"{path}:drift")


class DriftMonitor:
    """The telemetry writer's live histograms of the active model (this summary interval
    and since it went live) and each release's golden baseline; the OTA service arms it.

    ``observe`` and ``finish_interval`` run on the writer thread; ``arm`` and
    ``since_live`` on others (a lock guards the counts, never held for I/O).
    """

    def __init__(self, over_key: str | None = None) -> None:
        self._lock = threading.Lock()
        self._armed: dict[tuple[str, str], tuple[GoldenBaseline | None, DriftPolicy]] = {}
        self._active: tuple[str, str] | None = None
        self._interval_classes: dict[int, int] = {}
        self._interval_conf = [0] * CONFIDENCE_BINS
        self._live_classes: dict[int, int] = {}
        self._live_conf = [0] * CONFIDENCE_BINS
        # "name-version" of the model whose drift was over the limit at the last judged
        # summary (kept by the recorder across restarts: one event per crossing)
        self.over_key = over_key

    def arm(
        self, name: str, version: str, baseline: GoldenBaseline | None, policy: DriftPolicy
    ) -> None:
        with self._lock:
            self._armed[(name, version)] = (baseline, policy)

    def observe(self, meta: Mapping[str, Any], top_class: int, confidence: float) -> None:
        key = (str(meta.get("model", "")), str(meta.get("version", "")))
        bucket = confidence_bucket(confidence)
        with self._lock:
            if key != self._active:
                # another model went live: its counts start afresh
                self._active = key
                self._interval_classes, self._interval_conf = {}, [0] * CONFIDENCE_BINS
                self._live_classes, self._live_conf = {}, [0] * CONFIDENCE_BINS
            self._interval_classes[top_class] = self._interval_classes.get(top_class, 0) + 1
            self._interval_conf[bucket] += 1
            self._live_classes[top_class] = self._live_classes.get(top_class, 0) + 1
            self._live_conf[bucket] += 1

    def finish_interval(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the summary's ``drift`` figures, a ``model.drift`` event's attributes when this
        summary crossed the limit); both None without an armed baseline or frames. The
        interval's counts start again."""
        with self._lock:
            key = self._active
            classes, conf = self._interval_classes, self._interval_conf
            self._interval_classes, self._interval_conf = {}, [0] * CONFIDENCE_BINS
            armed = self._armed.get(key) if key is not None else None
        if key is None or armed is None or not classes:
            return None, None
        baseline, policy = armed
        if baseline is None:
            return None, None
        figures = drift_figures(baseline, classes, conf)
        name = f"{key[0]}-{key[1]}"
        alarm = DriftAlarm(over=self.over_key == name)
        crossed = alarm.update(figures.class_psi, policy, figures.frames)
        if figures.frames >= policy.min_frames:
            self.over_key = name if alarm.over else None
        summary: dict[str, Any] = {
            "model": key[0],
            "version": key[1],
            **figures.to_dict(),
            "psi_max": policy.psi_max,
            "judged": figures.frames >= policy.min_frames,
            "over": alarm.over,
            "golden_rows": baseline.rows,
        }
        event = None
        if crossed:
            event = {
                "model": key[0],
                "version": key[1],
                "class_psi": summary["class_psi"],
                "confidence_psi": summary["confidence_psi"],
                "psi_max": policy.psi_max,
                "frames": figures.frames,
            }
        return summary, event

    def since_live(self, name: str, version: str) -> DriftFigures | None:
        """Drift of ``name`` ``version`` over every frame since it went live (None when it
        is not the model observed last, has no baseline or no frames yet)."""
        with self._lock:
            if self._active != (name, version) or not self._live_classes:
                return None
            armed = self._armed.get((name, version))
            classes, conf = dict(self._live_classes), list(self._live_conf)
        if armed is None or armed[0] is None:
            return None
        return drift_figures(armed[0], classes, conf)
