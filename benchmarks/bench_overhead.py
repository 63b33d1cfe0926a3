"""Agent frame-loop cost: the uncapped daemon loop vs a bare session.run loop, interleaved.

Both run the CNN demo model on the same ready tensors (synthetic "tensor" frames: no image
decoding), so the ratio measures the agent's own per-frame work: pacing, slot read,
postprocessing, a JSONL sink and telemetry. Prints `pipeline_overhead_ratio=<agent/bare>`
last; the target is >= 0.95.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 20] [--frames 150]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import (  # noqa: E402
    AgentConfig,
    GovernorConfig,
    ModelConfig,
    SchedulerConfig,
    SinkConfig,
    SourceConfig,
    StatusConfig,
    TelemetryConfig,
)
from agent.daemon import Daemon  # noqa: E402
from agent.pipeline.sources import SyntheticSource  # noqa: E402

MODEL = REPO_ROOT / "agent" / "demo" / "models" / "cnn_fp32.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--no-telemetry", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    config = AgentConfig(
        state_dir=tmp / "state",
        model=ModelConfig(path=MODEL, backend="onnx", intra_op_threads=1, warmup_runs=5),
        source=SourceConfig(kind="synthetic", pattern="tensor"),
        scheduler=SchedulerConfig(fps_cap=0.0),
        governor=GovernorConfig(sysfs_root=tmp / "sys", use_psutil=False),
        sinks=(SinkConfig(kind="jsonl", path=tmp / "results.jsonl", queue_size=10_000),),
        telemetry=TelemetryConfig(enabled=not args.no_telemetry, db_path=tmp / "t.db"),
        status=StatusConfig(interval_s=1.0),
    )
    daemon = Daemon(config)
    daemon.start()
    source = daemon.source
    assert isinstance(source, SyntheticSource)
    backend = daemon.slot.current().backend
    session = backend.session
    name = backend.inputs[0].name
    # the very tensors the agent's source hands out, already batched
    tensors = [f[None] for f in source._frames]

    def bare(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            session.run(None, {name: tensors[i % len(tensors)]})
        return n / (time.perf_counter() - started)

    def agent(n: int) -> float:
        source.max_frames = source._seq + n
        daemon._stop_requested = False
        started = time.perf_counter()
        daemon.loop()
        return n / (time.perf_counter() - started)

    bare(50)
    agent(50)
    ratios, bare_fps, agent_fps = [], [], []
    for r in range(args.rounds):
        # alternate which goes first so drift in machine load hits both alike
        if r % 2 == 0:
            b, a = bare(args.frames), agent(args.frames)
        else:
            a, b = agent(args.frames), bare(args.frames)
        bare_fps.append(b)
        agent_fps.append(a)
        ratios.append(a / b)
        print(f"round {r}: bare {b:.1f} fps, agent {a:.1f} fps, ratio {a / b:.3f}")
    daemon.shutdown()
    print(f"bare_fps_median={statistics.median(bare_fps):.1f}")
    print(f"agent_fps_median={statistics.median(agent_fps):.1f}")
    print(f"frames_written={sum(1 for _ in (tmp / 'results.jsonl').open())}")
    print(f"pipeline_overhead_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
