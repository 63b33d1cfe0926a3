#!/usr/bin/env python3
"""Gate overhead: run_gate wall time vs a plain loop of backend runs of both models, interleaved.

"bare" loads both models and runs every golden row through each, one input at a time, as
plainly as possible; "gate" is run_gate() on the same models and golden set (loading,
warm-up, the timed interleaved pass, RSS sampling, metrics, checks, the report). Rounds
alternate which goes first so machine noise hits both alike; the figure is the ratio of
the medians, gate / bare (target <= 1.3). With --cache the gate reuses the baseline's
cached outputs (the OTA client's mode) and the ratio is usually below 1.

  python benchmarks/bench_gate.py [--baseline M] [--candidate M] [--golden DIR] [--rounds N]
                                  [--cache] [--tile N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.ota.golden import run_gate
from agent.runtime import load_backend

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "agent" / "demo" / "models"


def bare_loop(baseline: Path, candidate: Path, inputs: np.ndarray) -> float:
    t0 = time.perf_counter()
    a = load_backend(baseline)
    b = load_backend(candidate)
    for row in range(len(inputs)):
        x = inputs[row : row + 1]
        a.run(x)
        b.run(x)
    a.close()
    b.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=MODELS / "digits_fp32.onnx")
    parser.add_argument("--candidate", type=Path, default=MODELS / "digits_int8.onnx")
    parser.add_argument("--golden", type=Path, default=ROOT / "golden_local")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cache", action="store_true", help="gate with the baseline cache")
    parser.add_argument(
        "--tile", type=int, default=1, help="repeat the golden set N times (a larger set)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        golden = args.golden
        if args.tile > 1:
            golden = Path(tmp) / "golden"
            golden.mkdir()
            for name in ("inputs", "labels", "slices"):
                arr = np.load(args.golden / f"{name}.npy", allow_pickle=False)
                np.save(golden / f"{name}.npy", np.concatenate([arr] * args.tile))
        args.golden = golden
        inputs = np.load(golden / "inputs.npy", allow_pickle=False)
        cache = Path(tmp) / "cache" if args.cache else None
        # One untimed round of each pays the one-off costs (imports, ORT environment, the
        # cache's first fill) so the rounds compare steady-state work.
        bare_loop(args.baseline, args.candidate, inputs)
        run_gate(args.baseline, args.candidate, args.golden, baseline_cache=cache)
        bare_s: list[float] = []
        gate_s: list[float] = []
        for r in range(max(1, args.rounds)):
            for which in ("bare", "gate") if r % 2 == 0 else ("gate", "bare"):
                if which == "bare":
                    bare_s.append(bare_loop(args.baseline, args.candidate, inputs))
                else:
                    t0 = time.perf_counter()
                    report = run_gate(
                        args.baseline, args.candidate, args.golden, baseline_cache=cache
                    )
                    gate_s.append(time.perf_counter() - t0)
    bare, gate = statistics.median(bare_s), statistics.median(gate_s)
    print(f"golden rows: {len(inputs)}; models: {args.baseline.name} vs {args.candidate.name}")
    print(f"cache: {'on (baseline from cache)' if args.cache else 'off'}; rounds: {args.rounds}")
    print(f"bare loop (load both + {len(inputs)} rows x 2 runs): median {bare * 1000:.1f} ms")
    print(f"run_gate: median {gate * 1000:.1f} ms (verdict: {'pass' if report.passed else 'fail'})")
    print(f"gate_overhead_ratio={gate / bare:.3f}")


if __name__ == "__main__":
    main()
