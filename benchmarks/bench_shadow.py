"""Does the shadow evaluation delay the served frame? The daemon's frame loop at an FPS cap,
shadow on vs off, in interleaved segments.

The served model is the CNN demo model; the shadow model (on its worker thread, fed by
the frame loop's queue of one) is its int8 twin, as during a shadow period before
activation. Each round runs three segments back to back: shadow off, shadow on, shadow off
again. The served-frame latency is the daemon's own per-frame inference time (the figure
`edge-agent status` shows), plus the time the frame loop spends handing a frame to the
shadow. For each round: P99 on / P99 off (the first off segment), and as the noise floor
P99 off-again / P99 off (an A/A pair: nothing changed but time). Prints the medians over
the rounds, the spread, what the shadow took and dropped, and `shadow_served_p99_ratio=<x>`
last (target <= 1.10).

    .venv/bin/python benchmarks/bench_shadow.py [--rounds 8] [--seconds 5] [--cap 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import (  # noqa: E402
    AgentConfig,
    GovernorConfig,
    ModelConfig,
    SchedulerConfig,
    SourceConfig,
    StatusConfig,
    TelemetryConfig,
)
from agent.daemon import Daemon  # noqa: E402
from agent.ota.shadow import ShadowPolicy  # noqa: E402
from agent.ota.shadow_run import ShadowRun  # noqa: E402
from agent.pipeline.model import configured_model  # noqa: E402
from agent.pipeline.slot import ActiveModel  # noqa: E402
from agent.pipeline.sources import Frame, SyntheticSource  # noqa: E402

MODELS = REPO_ROOT / "agent" / "demo" / "models"
SERVED = MODELS / "cnn_fp32.onnx"
SHADOW = MODELS / "cnn_int8.onnx"


class TimedFeed:
    """The shadow's feed, timed: what the frame loop spends handing each frame over."""

    def __init__(self, run: ShadowRun) -> None:
        self.run = run
        self.spent_s: list[float] = []

    def __call__(
        self,
        model: ActiveModel,
        frames: Sequence[Frame],
        outputs: Sequence[Any],
        latency_s: float,
        fps_cap: float,
    ) -> bool:
        t0 = time.perf_counter()
        taken = self.run.offer(model, frames, outputs, latency_s, fps_cap)
        self.spent_s.append(time.perf_counter() - t0)
        return taken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="off/on/off rounds (interleaved)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per segment")
    ap.add_argument("--cap", type=float, default=30.0, help="FPS cap")
    ap.add_argument("--sample-rate", type=float, default=0.25)
    ap.add_argument("--cpu-budget-pct", type=float, default=25.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    config = AgentConfig(
        state_dir=tmp / "state",
        model=ModelConfig(path=SERVED, backend="onnx", intra_op_threads=1, warmup_runs=5),
        source=SourceConfig(kind="synthetic", pattern="tensor"),
        scheduler=SchedulerConfig(fps_cap=args.cap),
        governor=GovernorConfig(enabled=False),
        sinks=(),
        telemetry=TelemetryConfig(enabled=False),
        status=StatusConfig(interval_s=1.0, path=tmp / "status.json"),
    )
    shadow_config = AgentConfig(
        model=ModelConfig(path=SHADOW, backend="onnx", intra_op_threads=1, warmup_runs=5)
    )
    policy = ShadowPolicy(
        sample_rate=args.sample_rate, cpu_budget_pct=args.cpu_budget_pct, min_frames=1
    )
    daemon = Daemon(config)
    daemon.start()
    source = daemon.source
    assert isinstance(source, SyntheticSource)
    frames_per_segment = round(args.cap * args.seconds)

    def segment(feed: TimedFeed | None) -> list[float]:
        """One segment's served-frame latencies in ms (inference + the shadow hand-over)."""
        daemon.set_shadow(feed)
        daemon.scheduler.restart()
        source.max_frames = source._seq + frames_per_segment
        daemon._stop_requested = False
        done0 = daemon.stats.batches
        daemon.loop()
        daemon.set_shadow(None)
        served = daemon.stats.batches - done0
        lat_ms = list(daemon.stats.latencies.last_ms(served))
        if feed is not None:
            handed = feed.spent_s[-len(lat_ms) :]
            lat_ms = [ms + s * 1000.0 for ms, s in zip(lat_ms, handed)]
        return lat_ms

    ratios: list[float] = []
    noise: list[float] = []
    p99_off: list[float] = []
    p99_on: list[float] = []
    taken = dropped = compared = 0
    try:
        for _ in range(args.rounds):
            run = ShadowRun(policy, lambda: configured_model(shadow_config), shadow_is_new=True)
            run.start()
            while not run._ready:  # the shadow model loads before the round starts
                time.sleep(0.05)
            feed = TimedFeed(run)
            off = float(np.percentile(segment(None), 99))
            on = float(np.percentile(segment(feed), 99))
            again = float(np.percentile(segment(None), 99))
            run.close(5.0)
            taken += run.tally.frames
            dropped += run.tally.dropped
            compared += run.offered
            p99_off.append(off)
            p99_on.append(on)
            ratios.append(on / off)
            noise.append(again / off)
    finally:
        daemon.shutdown()
    print(
        f"served model {SERVED.name}, shadow {SHADOW.name}, cap {args.cap:g} fps, "
        f"{args.rounds} rounds of 3 x {args.seconds:g} s, sample rate {args.sample_rate:g}, "
        f"CPU budget {args.cpu_budget_pct:g} %"
    )
    print(f"served p99 off: median {np.median(p99_off):.3f} ms; on: {np.median(p99_on):.3f} ms")
    print(
        f"shadow: {taken} of {compared} offered frames compared, {dropped} dropped "
        "(busy, over budget or no idle time)"
    )
    print(
        f"per-round on/off ratios {min(ratios):.3f}..{max(ratios):.3f}; "
        f"noise (off-again/off) median {np.median(noise):.3f}, {min(noise):.3f}..{max(noise):.3f}"
    )
    print(f"shadow_served_p99_ratio={float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
