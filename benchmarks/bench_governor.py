"""Governor reaction and stability: a fake sysfs thermal zone ramps past soft and hard limits.

A real daemon (digits demo model, 30 FPS cap, governor every 1 s) reads a temp dir laid out
like /sys/class/thermal while a thread writes a temperature trace: ramp 50 -> 95 C, hold,
a noisy plateau around the soft limit, then cool down until the cap is back. Side by side,
a naive threshold governor (no hysteresis, no steps) reads the same file on the same
schedule. Reports how long the daemon took from each crossing to the cap change / pause,
and how often each governor reversed direction (oscillation).
Prints `governor_react_s=<x>` last (target <= 2).

    .venv/bin/python benchmarks/bench_governor.py
"""

from __future__ import annotations

import itertools
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import (  # noqa: E402
    AgentConfig,
    GovernorConfig,
    ModelConfig,
    PreprocessConfig,
    SchedulerConfig,
    StatusConfig,
    TelemetryConfig,
)
from agent.daemon import Daemon  # noqa: E402
from agent.health.sensors import SensorReader  # noqa: E402

MODEL = REPO_ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"
SOFT_C, HARD_C, BASE_FPS = 70.0, 85.0, 30.0


def trace_c(t: float, rng: random.Random) -> float:
    if t < 5:
        return 50.0
    if t < 20:
        return 50.0 + (t - 5) * 3.0  # crosses 70 at 11.7 s, 85 at 16.7 s
    if t < 24:
        return 95.0
    if t < 32:
        return 69.0 + rng.uniform(-2.0, 2.0)  # a noisy plateau across the soft limit
    return 58.0


def reversals(caps: list[float]) -> int:
    """How often the cap changed direction (down then up, or up then down)."""
    moves = [b - a for a, b in itertools.pairwise(caps) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-governor-"))
    zone = tmp / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")

    def write_temp(temp_c: float) -> None:
        part = zone / ".temp"
        part.write_text(f"{int(temp_c * 1000)}\n")
        part.replace(zone / "temp")

    write_temp(50.0)
    gov_cfg = GovernorConfig(
        sysfs_root=tmp / "sys",
        use_psutil=False,
        interval_s=1.0,
        soft_limit_c=SOFT_C,
        hard_limit_c=HARD_C,
        hysteresis_c=5.0,
        step_factor=0.75,
        min_fps=2.0,
    )
    config = AgentConfig(
        state_dir=tmp / "state",
        model=ModelConfig(path=MODEL, backend="onnx", warmup_runs=2),
        preprocess=PreprocessConfig(color_order="GRAY", scale=1 / 255),
        scheduler=SchedulerConfig(fps_cap=BASE_FPS),
        governor=gov_cfg,
        telemetry=TelemetryConfig(enabled=False),
        status=StatusConfig(interval_s=1.0),
    )
    daemon = Daemon(config)
    daemon.start()
    loop = threading.Thread(target=daemon.loop, daemon=True)
    loop.start()

    # the naive baseline: full speed below the soft limit, minimum above it, pause at hard
    naive_reader = SensorReader(gov_cfg)
    naive_caps: list[float] = []
    stop = threading.Event()

    def naive() -> None:
        while not stop.wait(gov_cfg.interval_s):
            temp = naive_reader.read().max_temp_c or 0.0
            naive_caps.append(0.0 if temp >= HARD_C else 2.0 if temp >= SOFT_C else BASE_FPS)

    threading.Thread(target=naive, daemon=True).start()

    rng = random.Random(1)
    started = time.monotonic()
    soft_cross = hard_cross = None
    soft_react = hard_react = None
    caps: list[float] = []
    frames_while_paused = None
    while (t := time.monotonic() - started) < 46.0:
        temp = trace_c(t, rng)
        write_temp(temp)
        if soft_cross is None and temp >= SOFT_C:
            soft_cross = t
        if hard_cross is None and temp >= HARD_C:
            hard_cross = t
        cap = daemon.scheduler.fps_cap
        paused = daemon.governor is not None and daemon.governor.paused
        caps.append(0.0 if paused else cap)
        if soft_cross is not None and soft_react is None and cap < BASE_FPS:
            soft_react = t - soft_cross
        if hard_cross is not None and hard_react is None and paused:
            hard_react = t - hard_cross
            frames_while_paused = daemon.stats.frames
        time.sleep(0.05)
    stop.set()
    paused_frames = daemon.stats.frames - (frames_while_paused or 0)
    steps = daemon.governor.governor.steps if daemon.governor else 0
    daemon.request_stop("bench done")
    loop.join(10)
    daemon.shutdown()

    assert soft_react is not None and hard_react is not None, "the governor never reacted"
    print(f"soft limit crossed at {soft_cross:.2f} s, cap lowered {soft_react:.2f} s later")
    print(f"hard limit crossed at {hard_cross:.2f} s, paused {hard_react:.2f} s later")
    print(f"governor steps: {steps}; final cap {caps[-1]:g} (configured {BASE_FPS:g})")
    print(f"frames after pause until the end (incl. recovery): {paused_frames}")
    print(
        f"oscillation: agent reversals={reversals(caps)}, naive reversals={reversals(naive_caps)}"
    )
    print(f"governor_react_s={max(soft_react, hard_react):.2f}")


if __name__ == "__main__":
    main()
