#!/usr/bin/env python3
"""Build golden_local/ (the demo digits model's golden set) reproducibly from scikit-learn's digits.

Usage:
  python tools/build_golden_set.py                  # golden_local/{inputs,labels,slices}.npy
  python tools/build_golden_set.py --check          # rebuild in memory, compare with the files
  python tools/build_golden_set.py --out DIR        # write somewhere else
  python tools/build_golden_set.py --form frames    # golden_local/raw/: raw uint8 frames
  python tools/build_golden_set.py --form frames --check

Two forms of the same rows:
  tensors  inputs.npy: what the model receives after preprocessing (float32 [N,1,8,8])
  frames   frames.npy: what the source delivers (uint8 [N,8,8] gray frames, pixel/16*255
           rounded), with preprocess.yaml (resize 8x8, GRAY, NCHW, scale 1/255: the demo
           packages' preprocess block) for bare model files; the gate runs each model's
           own preprocess -> model -> postprocess on them (docs/gate.md)

Rows with index % 5 == 0 of `sklearn.datasets.load_digits()` are the golden set (the demo
models are trained on the other rows). Inputs are pixel/16 as float32 [N,1,8,8]. Slices:
  bold  golden rows whose mean ink is at or above the golden median
  thin  golden rows below the median (faint strokes are the harder half)
  dim   a synthetic low-light copy of every third golden row (pixels x DIM_FACTOR)
policy.yaml (and preprocess.yaml) are written only when missing (hand-edited device
policy, not data).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "golden_local"
FRAMES_OUT = DEFAULT_OUT / "raw"
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


PREPROCESS_YAML = """\
# How a bare model file (no package manifest) turns these frames into its input; a
# package's own `preprocess` block always wins. The demo packages' block.
resize: [8, 8]
layout: NCHW
color_order: GRAY
mean: [0.0]
std: [1.0]
scale: 0.00392156862745098     # 1/255: uint8 pixels -> [0, 1]
"""

DRIFT_YAML = """\
drift:                         # the live model against its golden-set baseline
  psi_max: 0.25                # class-histogram PSI above this is a model.drift event
  min_frames: 50               # summaries with fewer frames are not judged
"""


def frame_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same rows as raw 8x8 uint8 gray frames, as a camera or the synthetic source
    delivers them (the tensors are pixel/16 in [0, 1]: x 255, rounded)."""
    frames = np.rint(arrays["inputs"][:, 0] * 255.0).clip(0, 255).astype(np.uint8)
    return {"frames": frames, "labels": arrays["labels"], "slices": arrays["slices"]}


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default golden_local/, or golden_local/raw/ for --form frames)",
    )
    parser.add_argument(
        "--form",
        choices=("tensors", "frames"),
        default="tensors",
        help="tensors: inputs.npy model inputs; frames: frames.npy raw uint8 frames",
    )
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = FRAMES_OUT if args.form == "frames" else DEFAULT_OUT
    sys.path.insert(0, str(ROOT))
    from agent.textio import write_atomic

    arrays = build_arrays()
    if args.form == "frames":
        arrays = frame_arrays(arrays)
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
        write_atomic(policy, (POLICY_YAML + DRIFT_YAML).encode())
    if args.form == "frames" and not (args.out / "preprocess.yaml").exists():
        write_atomic(args.out / "preprocess.yaml", PREPROCESS_YAML.encode())
    counts = {s: int((arrays["slices"] == s).sum()) for s in ("bold", "thin", "dim")}
    print(f"wrote {len(arrays['labels'])} {args.form} rows to {args.out} (slices {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
