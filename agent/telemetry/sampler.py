"""Which inference results are kept (deterministic by seq), PII masking, interval summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.pipeline.latency import PERCENTILES, sorted_percentile

MASKED = "<masked>"
_MASK64 = (1 << 64) - 1
SAMPLE_SCALE = 1_000_000
CONFIDENCE_BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _splitmix64(value: int) -> int:
    # A fixed integer mix: anyone can recompute which seqs were sampled, on any platform.
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def is_sampled(seq: int, sample_rate: float) -> bool:
    """True for about sample_rate of all seqs; the same seq always gives the same answer."""
    if sample_rate <= 0.0:
        return False
    if sample_rate >= 1.0:
        return True
    return _splitmix64(seq & _MASK64) % SAMPLE_SCALE < int(sample_rate * SAMPLE_SCALE)


def mask_pii(data: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """A copy with the configured fields' values replaced by "<masked>".

    A plain name ("plate") matches that key at any depth, inside mappings and lists of
    mappings; a dotted path ("camera.owner") matches that chain of keys wherever it starts
    ("meta.camera.owner", "source_meta.camera.owner", not a lone "owner"). Names match
    case-insensitively; a matched value is replaced whole (a mapping or list included).
    """
    names = {f.lower() for f in fields if "." not in f}
    paths = {f.lower() for f in fields if "." in f}
    masked: dict[str, Any] = _mask(data, names, paths, "")
    return masked


def _path_matches(path: str, paths: set[str]) -> bool:
    return any(path == p or path.endswith("." + p) for p in paths)


def _mask(value: Any, names: set[str], paths: set[str], prefix: str) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            key_s = str(key)
            path = f"{prefix}.{key_s}".lower() if prefix else key_s.lower()
            if key_s.lower() in names or (paths and _path_matches(path, paths)):
                out[key_s] = MASKED
            else:
                out[key_s] = _mask(item, names, paths, path)
        return out
    if isinstance(value, (list, tuple)):
        return [_mask(item, names, paths, prefix) for item in value]
    return value


@dataclass
class IntervalSummary:
    """Accumulates one interval of inference results and gauges into a summary dict."""

    start_unix_ns: int
    start_mono_ns: int
    latencies_s: list[float] = field(default_factory=list)
    class_counts: dict[int, int] = field(default_factory=dict)
    confidence_counts: list[int] = field(default_factory=lambda: [0] * 10)
    temps_max_c: dict[str, float] = field(default_factory=dict)
    # detectors: frames seen, boxes per frame (0, 1, ..., 9, 10 or more), box score histogram
    box_frames: int = 0
    box_count_counts: list[int] = field(default_factory=lambda: [0] * 11)
    box_score_counts: list[int] = field(default_factory=lambda: [0] * 10)

    def observe_boxes(self, scores: Sequence[float]) -> None:
        self.box_frames += 1
        self.box_count_counts[min(10, len(scores))] += 1
        for score in scores:
            self.box_score_counts[min(9, max(0, int(score * 10))) if score == score else 0] += 1

    def observe(self, latency_s: float, top_class: int, confidence: float) -> None:
        self.latencies_s.append(latency_s)
        self.class_counts[top_class] = self.class_counts.get(top_class, 0) + 1
        bucket = min(9, max(0, int(confidence * 10))) if confidence == confidence else 0
        self.confidence_counts[bucket] += 1

    def observe_temps(self, temps_c: Mapping[str, float]) -> None:
        for zone, temp in temps_c.items():
            self.temps_max_c[zone] = max(temp, self.temps_max_c.get(zone, temp))

    def finish(
        self,
        end_unix_ns: int,
        end_mono_ns: int,
        temps_c: Mapping[str, float],
        governor_state: str,
        fps_cap: float,
    ) -> dict[str, Any]:
        frames = len(self.latencies_s)
        elapsed_s = max(1e-9, (end_mono_ns - self.start_mono_ns) / 1e9)
        summary: dict[str, Any] = {
            "start_unix_ns": self.start_unix_ns,
            "end_unix_ns": end_unix_ns,
            "interval_s": round(elapsed_s, 3),
            "frames": frames,
            "fps": round(frames / elapsed_s, 3),
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            "confidence_bounds": list(CONFIDENCE_BOUNDS),
            "confidence_counts": list(self.confidence_counts),
            "temps_c": dict(temps_c),
            "temps_max_c": dict(self.temps_max_c),
            "governor_state": governor_state,
            "fps_cap": fps_cap,
        }
        if self.box_frames:
            summary["boxes"] = {
                "frames": self.box_frames,
                "total": sum(self.box_score_counts),
                "count_counts": list(self.box_count_counts),  # frames with 0..9, 10+ boxes
                "score_bounds": list(CONFIDENCE_BOUNDS),
                "score_counts": list(self.box_score_counts),
            }
        if frames:
            lat_ms = np.asarray(self.latencies_s, dtype=np.float64) * 1000.0
            ordered = np.sort(lat_ms).tolist()
            p50, p95, p99 = (sorted_percentile(ordered, q) for q in PERCENTILES)
            summary.update(
                latency_p50_ms=round(float(p50), 4),
                latency_p95_ms=round(float(p95), 4),
                latency_p99_ms=round(float(p99), 4),
                latency_sum_ms=round(float(lat_ms.sum()), 4),
            )
        return summary
