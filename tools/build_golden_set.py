#!/usr/bin/env python3
"""Build golden_local/ (the demo digits model's golden set) reproducibly from scikit-learn's digits.

Usage:
  python tools/build_golden_set.py              # write golden_local/{inputs,labels,slices}.npy
  python tools/build_golden_set.py --check      # rebuild in memory, compare with the files
  python tools/build_golden_set.py --out DIR    # write somewhere else

Rows with index % 5 == 0 of `sklearn.datasets.load_digits()` are the golden set (the demo
models are trained on the other rows). Inputs are pixel/16 as float32 [N,1,8,8]. Slices:
  bold  golden rows whose mean ink is at or above the golden median
  thin  golden rows below the median (faint strokes are the harder half)
  dim   a synthetic low-light copy of every third golden row (pixels x DIM_FACTOR)
policy.yaml is written only when missing (it is hand-edited device policy, not data).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "golden_local"
DIM_FACTOR = np.float32(0.5)
DIM_EVERY = 3

POLICY_YAML = """\
# Gate thresholds for this device (DESIGN §7). A package's `gate` may tighten these
# (lower a *_max* / slack value, raise a *_min value) but never loosen them.
accuracy_drop_max_pp: 0.3      # candidate may lose at most 0.3 percentage points
f1_drop_max_pp: 0.5            # macro F1
ece_increase_max: 0.02         # expected calibration error, 15 equal-width bins
agreement_min: 0.98            # top-1 agreement with the current model ... or
prob_mse_max: 0.001            # ... softmax-probability MSE (either passes)
logit_cosine_min: 0.999        # only when both models have the same precision
class_recall_drop_max_pp: 2.0  # no class's recall may drop more
latency_p95_ratio_max: 1.2     # candidate p95 <= ratio * current p95 + slack
latency_p95_slack_ms: 0.5
memory_added_max_mb: 256
map_drop_max_pp: 0.5           # detection
miou_drop_max_pp: 0.5          # segmentation
gate_timeout_s: 300            # the gate's child process is killed after this (wall clock)
gate_memory_max_mb: 1024       # ... and its address space (RLIMIT_AS) capped at this
"""


def build_arrays() -> dict[str, np.ndarray]:
    """The golden arrays, identical on every run (no randomness)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = np.arange(len(data.target))
    golden = idx % 5 == 0
    x = (data.images[golden] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target[golden].astype(np.int64)
    ink = x.reshape(len(x), -1).mean(axis=1)
    slices = np.where(ink >= np.median(ink), "bold", "thin").astype("<U8")
    dim_rows = np.arange(0, len(x), DIM_EVERY)
    x_dim = (x[dim_rows] * DIM_FACTOR).astype(np.float32)
    return {
        "inputs": np.concatenate([x, x_dim]),
        "labels": np.concatenate([y, y[dim_rows]]),
        "slices": np.concatenate([slices, np.full(len(dim_rows), "dim", dtype="<U8")]),
    }


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from agent.textio import write_atomic

    arrays = build_arrays()
    if args.check:
        stale = [
            name
            for name, arr in arrays.items()
            if not (args.out / f"{name}.npy").is_file()
            or (args.out / f"{name}.npy").read_bytes() != npy_bytes(arr)
        ]
        if stale:
            print(f"Error: {', '.join(stale)} differ from a fresh build ({args.out})")
            return 1
        print(f"golden set in {args.out} matches a fresh build")
        return 0
    for name, arr in arrays.items():
        write_atomic(args.out / f"{name}.npy", npy_bytes(arr))
    policy = args.out / "policy.yaml"
    if not policy.exists():
        write_atomic(policy, POLICY_YAML.encode())
    counts = {s: int((arrays["slices"] == s).sum()) for s in ("bold", "thin", "dim")}
    print(f"wrote {len(arrays['labels'])} rows to {args.out} (slices {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
