"""Hot swap under load: the daemon at its FPS cap on the CNN while 20 new models are swapped in.

Each swap is what the OTA service does in a running daemon: load and warm the new model
beside the live one (on another thread, here the same thread an OTA install runs on),
then ``daemon.swap_model`` between two frames, and the loop closes the old backend at
the next frame boundary. FP32 and INT8 CNN models alternate. Steady frames (no swap in
progress) between the swaps are the side-by-side baseline.

Reports: frames lost (gaps in the source's seq at the sink, plus frame slots the
scheduler gave up because the loop ran a whole period late), and P99 frame latency
(frame read -> result at the sink, and the model run alone) during swaps vs steady.
Prints `hot_swap_p99_ratio=<x>` (target <= 2) and `hot_swap_dropped_frames=<n>` LAST
(target 0).

    .venv/bin/python benchmarks/bench_hot_swap.py [--swaps 20] [--fps 15] [--steady-s 0.8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
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
    SinkConfig,
    SourceConfig,
    StatusConfig,
    TelemetryConfig,
)
from agent.daemon import Daemon  # noqa: E402
from agent.pipeline.sinks import Sink  # noqa: E402
from agent.pipeline.slot import ActiveModel  # noqa: E402
from agent.runtime import BackendOptions, load_backend  # noqa: E402

MODELS = REPO_ROOT / "agent" / "demo" / "models"
CANDIDATES = (MODELS / "cnn_int8.onnx", MODELS / "cnn_fp32.onnx")


class ArrivalSink(Sink):
    """Records (seq, frame read time, arrival time, model run ms) for every result."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []
        super().__init__("arrivals", 100_000)

    def put(self, item: Mapping[str, Any]) -> None:
        # called on the frame loop's thread: no queue hop, so the arrival time is exact
        self.rows.append(
            (int(item["seq"]), float(item["ts"]), time.time(), float(item["latency_ms"]))
        )

    def write_one(self, item: Mapping[str, Any]) -> None:
        pass


def swap_in(daemon: Daemon, path: Path, options: BackendOptions, warmup: int) -> None:
    """Load and warm beside the live model, then swap between two frames (the OTA way)."""
    backend = load_backend(path, "onnx", options)
    backend.warmup(warmup)
    live = daemon.slot.current()
    daemon.swap_model(
        ActiveModel(
            backend=backend,
            name=path.stem,
            version=path.stem,
            preprocess=live.preprocess,
            labels=live.labels,
        )
    )


def p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--fps", type=float, default=15.0, help="the daemon's FPS cap")
    ap.add_argument("--steady-s", type=float, default=0.8, help="steady time after each swap")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    warmup = 3
    config = AgentConfig(
        state_dir=tmp / "state",
        model=ModelConfig(
            path=CANDIDATES[1], backend="onnx", intra_op_threads=1, warmup_runs=warmup
        ),
        source=SourceConfig(kind="synthetic", pattern="tensor"),
        scheduler=SchedulerConfig(fps_cap=args.fps),
        governor=GovernorConfig(sysfs_root=tmp / "sys", use_psutil=False),
        sinks=(SinkConfig(kind="jsonl", path=tmp / "results.jsonl"),),
        telemetry=TelemetryConfig(enabled=True, db_path=tmp / "t.db"),
        status=StatusConfig(interval_s=1.0),
    )
    daemon = Daemon(config)
    daemon.start()
    sink = ArrivalSink()
    daemon.sinks = (*daemon.sinks, sink)
    options = BackendOptions(intra_op_threads=1)
    windows: list[tuple[float, float]] = []
    resyncs_in_swaps = 0
    errors: list[BaseException] = []
    period_s = 1.0 / args.fps

    def swapper() -> None:
        nonlocal resyncs_in_swaps
        try:
            time.sleep(1.0)  # steady frames first
            for i in range(args.swaps):
                resyncs0 = daemon.scheduler.resyncs
                started = time.time()
                swap_in(daemon, CANDIDATES[i % 2], options, warmup)
                # the old backend is closed by the loop at the next frame: count that frame
                time.sleep(2 * period_s)
                windows.append((started, time.time()))
                resyncs_in_swaps += daemon.scheduler.resyncs - resyncs0
                time.sleep(args.steady_s)
        except BaseException as exc:  # reported below; the loop must still stop
            errors.append(exc)
        finally:
            daemon.request_stop("benchmark done")

    thread = threading.Thread(target=swapper, name="swapper")
    thread.start()
    daemon.loop()
    thread.join()
    swaps = daemon.slot.swaps - 1  # the first fill of the slot at start is not a swap
    daemon.shutdown()
    if errors:
        raise errors[0]

    rows = sink.rows
    seqs = [r[0] for r in rows]
    seq_gaps = sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b - a > 1)
    dropped = seq_gaps + resyncs_in_swaps
    swap_e2e, steady_e2e, swap_run, steady_run = [], [], [], []
    first_window = windows[0][0] if windows else float("inf")
    for _seq, read_s, arrived_s, run_ms in rows:
        e2e_ms = (arrived_s - read_s) * 1000.0
        if any(start <= read_s <= end for start, end in windows):
            swap_e2e.append(e2e_ms)
            swap_run.append(run_ms)
        elif read_s >= first_window - 0.5:
            steady_e2e.append(e2e_ms)
            steady_run.append(run_ms)
    e2e_ratio = p99(swap_e2e) / p99(steady_e2e)
    run_ratio = p99(swap_run) / p99(steady_run)
    print(
        f"{swaps} swaps at a {args.fps:g} FPS cap: {len(rows)} frames, seq gaps {seq_gaps}, "
        f"frame slots lost to lateness during swaps {resyncs_in_swaps}, "
        f"late frames {daemon.scheduler.late_frames}"
    )
    print(
        f"frame latency (read -> sink) p99: during swap {p99(swap_e2e):.2f} ms "
        f"({len(swap_e2e)} frames), steady {p99(steady_e2e):.2f} ms ({len(steady_e2e)} frames)"
        f" -> {e2e_ratio:.2f}x"
    )
    print(
        f"model run p99: during swap {p99(swap_run):.2f} ms, steady {p99(steady_run):.2f} ms"
        f" -> {run_ratio:.2f}x"
    )
    print(f"hot_swap_p99_ratio={e2e_ratio:.2f}")
    print(f"hot_swap_dropped_frames={dropped}")


if __name__ == "__main__":
    main()
