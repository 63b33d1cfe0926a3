#!/usr/bin/env python3
"""Build a "quietly bad" digits model: it passes the golden gate but disagrees in the field.

Usage:
  python tools/build_quiet_bad_release.py --out quiet_bad.onnx
  python tools/build_quiet_bad_release.py --out quiet_bad.onnx --check
  python tools/build_quiet_bad_release.py --out quiet_bad.onnx \\
      --base agent/demo/models/digits_fp32.onnx --floor 0.15 --check --field-contrast 0.5

The model is the base model's own graph (the demo digits MLP by default) with three nodes
added at its output: the darkest pixel of each input (ReduceMin), compared with --floor,
chooses (Where) between the base model's logits and the same logits rolled by one class.
On golden-set inputs, whose background is black (every row has pixels at 0), it is the
base model to the last bit, so the golden gate passes: same accuracy, calibration and
per-class recall, agreement 1.0, logit cosine 1.0. On frames from a washed-out field
camera (the synthetic source with `contrast: 0.5`: the background at mid grey) every
answer moves to the next class, with the same confidence, so neither the gate nor
probation's error, latency and confidence checks see anything: only a comparison with
the current model on the same live frames (shadow agreement) does.

--check runs the real gate (agent.ota.golden.run_gate, the device's own code) of the new
model against the base on golden_local/, then both models on --frames synthetic frames of
the field look and of the golden look, and prints the agreement on each; it exits 1 when
the gate fails or the field agreement is not below 0.5.

Package it like any model (docs/fleet.md, "Quality policy"):
  edge-agent package build --model quiet_bad.onnx --schema schema.yaml --out dist/ \\
      --version 1.2.0 --release-counter 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"
GOLDEN = ROOT / "golden_local"
# The darkest pixel above this (in the model's input domain) reads as a field frame. Golden
# rows have a black background (0.0); the field look's background sits at 1 - contrast.
DEFAULT_FLOOR = 0.15
DEFAULT_FIELD_CONTRAST = 0.5


def quiet_bad_model(base: bytes, floor: float = DEFAULT_FLOOR) -> bytes:
    """The base ONNX model with its answer rolled by one class when the input has no black."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(base)
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise SystemExit("base model must have one input and one output")
    out_name = graph.output[0].name
    classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    if classes < 2:
        raise SystemExit(f"base model output {out_name!r} needs a known class count")
    inner = f"{out_name}__base"
    for node in graph.node:
        node.output[:] = [inner if o == out_name else o for o in node.output]
    in_name = graph.input[0].name
    rank = len(graph.input[0].type.tensor_type.shape.dim)
    axes = list(range(1, rank))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    inits = [
        numpy_helper.from_array(np.array([floor], dtype=np.float32), "quiet_floor"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "quiet_col"),
        # column j of the rolled logits is the base's column j+1: every top-1 moves down one
        numpy_helper.from_array(np.roll(np.arange(classes, dtype=np.int64), -1), "quiet_roll"),
    ]
    if opset >= 18:  # ReduceMin takes its axes as an input from opset 18 on
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), "quiet_axes"))
        reduce_min = helper.make_node(
            "ReduceMin", [in_name, "quiet_axes"], ["quiet_darkest"], keepdims=1
        )
    else:
        reduce_min = helper.make_node("ReduceMin", [in_name], ["quiet_darkest"], axes=axes)
    graph.initializer.extend(inits)
    graph.node.extend(
        [
            reduce_min,
            helper.make_node("Reshape", ["quiet_darkest", "quiet_col"], ["quiet_darkest_col"]),
            helper.make_node("Greater", ["quiet_darkest_col", "quiet_floor"], ["quiet_field"]),
            helper.make_node("Gather", [inner, "quiet_roll"], ["quiet_rolled"], axis=1),
            helper.make_node("Where", ["quiet_field", "quiet_rolled", inner], [out_name]),
        ]
    )
    del graph.value_info[:]
    graph.name = f"{graph.name}_quiet_bad"
    onnx.checker.check_model(model)
    if graph.output[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise SystemExit("base model output must be float32")
    data: bytes = model.SerializeToString()
    return data


def field_frames(count: int, contrast: float, seed: int = 0) -> np.ndarray:
    """Model inputs [count, 1, 8, 8] made from the synthetic source's frames (pixel / 255)."""
    from agent.pipeline.sources import SyntheticSource

    source = SyntheticSource((8, 8), "digits", seed=seed, contrast=contrast)
    rows = []
    for _ in range(count):
        frame = source.read(0.0)
        assert frame is not None
        rows.append(np.asarray(frame.data, dtype=np.float32)[None] / 255.0)
    return np.stack(rows).astype(np.float32)


def top1(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x})[0]
    labels: np.ndarray = np.asarray(logits).argmax(axis=1)
    return labels


def check(base: Path, candidate: Path, frames: int, contrast: float) -> int:
    from agent.ota.golden import run_gate

    report = run_gate(base, candidate, GOLDEN)
    failed = [c.name for c in report.checks if c.verdict == "fail"]
    print(f"gate on {GOLDEN.name}/: {'PASS' if report.passed else 'FAIL'}", end="")
    print(f" (failed: {', '.join(failed)})" if failed else "")
    field = field_frames(frames, contrast)
    golden_look = field_frames(frames, 1.0)
    field_agree = float((top1(base, field) == top1(candidate, field)).mean())
    golden_agree = float((top1(base, golden_look) == top1(candidate, golden_look)).mean())
    print(f"agreement with the base on {frames} synthetic frames, contrast 1.0: {golden_agree:.3f}")
    print(
        f"agreement with the base on {frames} synthetic frames, contrast {contrast:g}: "
        f"{field_agree:.3f}"
    )
    return 0 if report.passed and field_agree < 0.5 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the ONNX model")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the current model")
    parser.add_argument(
        "--floor",
        type=float,
        default=DEFAULT_FLOOR,
        help=f"darkest pixel over which an input reads as a field frame (default {DEFAULT_FLOOR})",
    )
    parser.add_argument("--check", action="store_true", help="run the gate and the agreements")
    parser.add_argument(
        "--field-contrast",
        type=float,
        default=DEFAULT_FIELD_CONTRAST,
        help=f"the field source's contrast for --check (default {DEFAULT_FIELD_CONTRAST})",
    )
    parser.add_argument("--frames", type=int, default=200, help="frames per look for --check")
    args = parser.parse_args(argv)
    try:
        base = args.base.read_bytes()
    except OSError as exc:
        print(f"Error: cannot read the base model ({args.base}: {exc.strerror})", file=sys.stderr)
        return 2
    from agent.textio import write_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, quiet_bad_model(base, args.floor))
    print(f"wrote {args.out}: {args.base.name} + field switch (darkest pixel > {args.floor:g})")
    if args.check:
        return check(args.base, args.out, args.frames, args.field_contrast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
