"""Latency and memory measurement of loaded backends, interleaved so noise hits all alike."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from agent.pipeline.latency import latency_summary_ms
from agent.runtime.base import AnyArray, Backend


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass
class BenchResult:
    """One model's figures from bench_models()."""

    label: str
    runs: int
    latencies_s: list[float]
    rss_added_bytes: int
    describe: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.latencies_s)
        return {
            "model": self.label,
            "backend": self.describe.get("backend"),
            "provider": self.describe.get("provider"),
            "runs": self.runs,
            **latency_summary_ms(self.latencies_s),
            "throughput_per_s": (self.runs / total) if total > 0 else 0.0,
            "rss_added_mb": self.rss_added_bytes / (1 << 20),
        }


def bench_models(
    models: Sequence[tuple[str, Backend, int]],
    make_input: Callable[[Backend], AnyArray],
    seconds: float,
    warmup_runs: int = 10,
    progress: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[BenchResult]:
    """Run each model on one input at a time, round-robin, for ``seconds`` in total.

    ``models`` holds (label, loaded backend, RSS in bytes before that backend was loaded).
    Warm-up runs are not counted.
    """
    inputs = [make_input(b) for _, b, _ in models]
    for (_, backend, _), x in zip(models, inputs):
        for _ in range(warmup_runs):
            backend.run(x)
    lat: list[list[float]] = [[] for _ in models]
    rss_peak = [current_rss_bytes() for _ in models]
    start = clock()
    deadline = start + seconds
    n = 0
    while True:
        for i, ((_, backend, _), x) in enumerate(zip(models, inputs)):
            t0 = clock()
            backend.run(x)
            lat[i].append(clock() - t0)
        n += 1
        now = clock()
        if n % 64 == 0:
            rss = current_rss_bytes()
            rss_peak = [max(r, rss) for r in rss_peak]
            if progress is not None:
                progress(min(1.0, (now - start) / seconds))
        if now >= deadline:
            break
    return [
        BenchResult(
            label=label,
            runs=len(lat[i]),
            latencies_s=lat[i],
            rss_added_bytes=max(0, rss_peak[i] - rss_before),
            describe=backend.describe(),
        )
        for i, (label, backend, rss_before) in enumerate(models)
    ]
