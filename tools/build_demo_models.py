#!/usr/bin/env python3
"""Build the demo models reproducibly into agent/demo/models/ (ONNX always, TFLite with TensorFlow).

Usage:
  python tools/build_demo_models.py            # ONNX models; keeps committed .tflite files
  python tools/build_demo_models.py --tflite   # also TFLite + TensorFlow reference outputs
                                               # (needs tensorflow-cpu; run once, commit)
  python tools/build_demo_models.py --shapes   # the shapes detector (ONNX) + golden_local/detection
  python tools/build_demo_models.py --shapes-tflite
                                               # its .tflite files from the saved weights (TF)
  python tools/build_demo_models.py --check    # verify committed files against SHA256SUMS

The digits classifier is trained on scikit-learn's bundled digits data (no download), the
CNN has fixed-seed weights. The shapes detector is fitted with scikit-learn on frames that
agent/demo/shapes.py draws from fixed seeds. The TFLite conversion needs TensorFlow, which the
agent never depends on: the small .tflite files and their TensorFlow reference outputs are
committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import demo_models as dm  # noqa: E402

sys.path.insert(0, str(HERE.parent))

from agent.demo.shapes import SHAPE_CLASSES, shapes_frames  # noqa: E402

OUT = HERE.parent / "agent" / "demo" / "models"
GOLDEN_DETECTION = HERE.parent / "golden_local" / "detection"
SHAPES_TRAIN_FRAMES, SHAPES_TRAIN_SEED = 800, 1
SHAPES_GOLDEN_FRAMES, SHAPES_GOLDEN_SEED = 128, 2
SHAPES_CALIB_FRAMES = 128
SHAPES_EPOCHS = 30
SHAPES_LOWERED_CLASS = 2  # triangle
SHAPES_DETECTION_YAML = """\
# How the gate decodes a bare detector file's outputs (a package's `detection` block wins).
layout: yolo            # [N, boxes, 4 + 1 + classes]: cx, cy, w, h, objectness, classes
box_units: normalized   # boxes as 0..1 shares of the 64x64 input
score_threshold: 0.25   # the daemon's operating point: mAP is measured on what it would emit
iou_threshold: 0.45     # per-class NMS
max_detections: 100
"""
SHAPES_POLICY_YAML = """\
# Gate thresholds for the detection golden set (DESIGN section 7); a package may only tighten.
map_drop_max_pp: 0.5           # mAP@0.5
map50_95_drop_max_pp: 2.0      # mAP@0.5:0.95 (COCO): int8 boxes move by a fraction of a pixel
class_ap_drop_max_pp: 5.0      # no class's AP@0.5 may drop more
latency_p95_ratio_max: 1.2
latency_p95_slack_ms: 0.5
memory_added_max_mb: 256
"""
REF = OUT / "reference"
SUMS = OUT / "SHA256SUMS"
REFERENCE_ROWS = 64


def build_onnx(out: Path) -> dm.MLPWeights:
    train_x, train_y, golden_x, golden_y = dm.load_digits_split()
    weights = dm.train_digits_mlp(train_x, train_y)
    weights.save(out / "digits_mlp_weights.npz")
    dm.mlp_onnx(weights, out / "digits_fp32.onnx")
    calib = train_x[:256]
    dm.quantize_onnx_static(out / "digits_fp32.onnx", out / "digits_int8.onnx", calib)
    acc = float((weights.logits(golden_x).argmax(1) == golden_y).mean())
    print(f"digits MLP: golden accuracy {acc:.4f} on {len(golden_y)} held-out rows")
    dm.cnn_onnx(out / "cnn_fp32.onnx")
    rng = np.random.default_rng(1)
    cnn_calib = rng.uniform(0, 1, (32, *dm.CNN_SHAPE)).astype(np.float32)
    dm.quantize_onnx_static(out / "cnn_fp32.onnx", out / "cnn_int8.onnx", cnn_calib)
    return weights


def build_shapes_onnx(out: Path, golden: Path) -> dm.ShapesDetWeights:
    """The synthetic-shapes detector (FP32, INT8 QDQ, one class lowered) and its golden set."""
    train = shapes_frames(SHAPES_TRAIN_FRAMES, seed=SHAPES_TRAIN_SEED)
    weights = dm.train_shapes_detector(train, epochs=SHAPES_EPOCHS)
    weights.save(out / "shapes_det_weights.npz")
    dm.shapes_det_onnx(weights, out / "shapes_det_fp32.onnx")
    # The convolutions carry the work; the decode tail (softmax, grid, concat) stays float.
    calib = dm.shapes_inputs(train[:SHAPES_CALIB_FRAMES])
    dm.quantize_onnx_static(
        out / "shapes_det_fp32.onnx",
        out / "shapes_det_int8.onnx",
        calib,
        op_types=["Conv"],
        per_channel=True,
    )
    dm.shapes_det_onnx(
        weights,
        out / "shapes_det_lowered.onnx",
        lowered_class=SHAPES_LOWERED_CLASS,
        name="shapes_det_lowered",
    )
    write_shapes_golden(golden)
    return weights


def write_shapes_golden(golden: Path) -> None:
    """golden_local/detection/: inputs.npy, annotations.json (COCO), detection.yaml, policy.yaml."""
    frames = shapes_frames(SHAPES_GOLDEN_FRAMES, seed=SHAPES_GOLDEN_SEED)
    golden.mkdir(parents=True, exist_ok=True)
    np.save(golden / "inputs.npy", dm.shapes_inputs(frames), allow_pickle=False)
    images, annotations = [], []
    for row, frame in enumerate(frames):
        images.append({"id": row + 1, "file_name": f"row{row:04d}", "width": 64, "height": 64})
        for box, cls in zip(frame.boxes.tolist(), frame.classes.tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": row + 1,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": "synthetic shapes, tools/build_demo_models.py"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SHAPE_CLASSES)],
    }
    (golden / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n")
    (golden / "detection.yaml").write_text(SHAPES_DETECTION_YAML)
    (golden / "policy.yaml").write_text(SHAPES_POLICY_YAML)
    print(f"detection golden set: {len(frames)} frames, {len(annotations)} boxes in {golden}")


def build_tflite(out: Path, weights: dm.MLPWeights) -> None:
    import tensorflow as tf

    train_x, _, golden_x, _ = dm.load_digits_split()
    w1, b1 = tf.constant(weights.w1), tf.constant(weights.b1)
    w2, b2 = tf.constant(weights.w2), tf.constant(weights.b2)

    class Digits(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, *dm.DIGITS_SHAPE], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            h = tf.nn.relu(tf.matmul(tf.reshape(x, [-1, 64]), w1) + b1)
            return tf.matmul(h, w2) + b2

    module = Digits()
    fn = module.__call__.get_concrete_function()

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    (out / "digits_fp32.tflite").write_bytes(conv.convert())

    def representative() -> object:
        for i in range(0, 256):
            yield [train_x[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (out / "digits_int8.tflite").write_bytes(conv.convert())

    # Reference outputs from TensorFlow's own interpreter, one row at a time.
    REF.mkdir(parents=True, exist_ok=True)
    x = golden_x[:REFERENCE_ROWS]
    np.save(REF / "tflite_inputs.npy", x)
    for name in ("digits_fp32", "digits_int8"):
        interp = tf.lite.Interpreter(model_path=str(out / f"{name}.tflite"))
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        outp = interp.get_output_details()[0]
        rows = []
        for row in x:
            feed = row[None]
            scale, zp = inp["quantization"]
            if inp["dtype"] == np.int8:
                feed = np.clip(np.round(feed / scale) + zp, -128, 127).astype(np.int8)
            interp.set_tensor(inp["index"], feed)
            interp.invoke()
            rows.append(interp.get_tensor(outp["index"]).copy())
        result = np.concatenate(rows)
        # FP32: float logits. INT8: the raw int8 output (compared exactly after dequantizing).
        np.save(REF / f"{name}_tflite_out.npy", result)
        print(f"{name}.tflite: reference outputs {result.shape} {result.dtype}")


def build_shapes_tflite(out: Path, weights: dm.ShapesDetWeights) -> None:
    """The shapes detector as TFLite, FP32 and full int8 (int8 input and output), the same
    graph as the ONNX one: input [N,1,64,64] (reshaped to NHWC inside: one channel),
    output [N,64,8] in the `yolo` layout with normalized boxes."""
    import tensorflow as tf

    train = shapes_frames(SHAPES_TRAIN_FRAMES, seed=SHAPES_TRAIN_SEED)
    calib = dm.shapes_inputs(train[:SHAPES_CALIB_FRAMES])
    k, g = 16, dm.SHAPES_GRID
    mean, std = 0.3, 0.3

    def conv1(w1: np.ndarray, b1: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        w = (w1 / std).reshape(k, k, 1, -1)  # (256, hidden) rows are (ky, kx)
        b = b1 - w1.sum(axis=0) * mean / std
        return tf.constant(w.astype(np.float32)), tf.constant(b.astype(np.float32))

    cw1, cb1 = conv1(weights.cls_w1, weights.cls_b1)
    bwx, bb = conv1(weights.box_wx, weights.box_b)
    cw2 = tf.constant(weights.cls_w2.reshape(1, 1, -1, 4))
    cb2 = tf.constant(weights.cls_b2)
    bwh = tf.constant(weights.box_wh.reshape(1, 1, -1, 4))
    rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    grid = tf.constant(np.stack([cc, rr], axis=-1)[None].astype(np.float32))

    class ShapesDet(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, *dm.SHAPES_INPUT], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            x = tf.reshape(x, [-1, 64, 64, 1])
            pooled = tf.nn.avg_pool2d(x, 2, 2, "VALID")
            padded = tf.pad(pooled, [[0, 0], [6, 6], [6, 6], [0, 0]])

            hidden = tf.nn.relu(tf.nn.conv2d(padded, cw1, 4, "VALID") + cb1)
            probs = tf.nn.softmax(tf.nn.conv2d(hidden, cw2, 1, "VALID") + cb2, axis=-1)
            raw = tf.nn.conv2d(hidden, bwh, 1, "VALID") + tf.nn.conv2d(padded, bwx, 4, "VALID") + bb
            objectness = 1.0 - probs[..., :1]
            cls = probs[..., 1:] / tf.maximum(objectness, 1e-6)
            xy = (raw[..., :2] + grid) / g
            out = tf.concat([xy, raw[..., 2:4], objectness, cls], axis=-1)
            return tf.reshape(out, [-1, g * g, 5 + dm.SHAPES_CLASSES])

    module = ShapesDet()
    fn = module.__call__.get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    (out / "shapes_det_fp32.tflite").write_bytes(conv.convert())

    def representative() -> object:
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (out / "shapes_det_int8.tflite").write_bytes(conv.convert())
    for name in ("shapes_det_fp32", "shapes_det_int8"):
        print(f"{name}.tflite: {(out / f'{name}.tflite').stat().st_size} bytes")


def model_files(out: Path) -> list[Path]:
    return sorted(
        p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS" and p.suffix != ".md"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sums(out: Path) -> None:
    lines = [f"{sha256(p)}  {p.relative_to(out).as_posix()}" for p in model_files(out)]
    SUMS.write_text("\n".join(lines) + "\n")


def check_sums(out: Path) -> int:
    bad = 0
    for line in SUMS.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = out / name
        if not path.is_file() or sha256(path) != digest:
            print(f"MISMATCH {name}")
            bad += 1
    print("all demo model files match SHA256SUMS" if not bad else f"{bad} files differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflite", action="store_true", help="also build TFLite (needs TF)")
    parser.add_argument("--check", action="store_true", help="verify files against SHA256SUMS")
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="only the synthetic-shapes detector (ONNX) and golden_local/detection/",
    )
    parser.add_argument(
        "--shapes-tflite",
        action="store_true",
        help="only the shapes detector's .tflite files, from the committed "
        "shapes_det_weights.npz (needs TensorFlow)",
    )
    args = parser.parse_args()
    if args.check:
        return check_sums(OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.shapes_tflite:
        build_shapes_tflite(OUT, dm.ShapesDetWeights.load(OUT / "shapes_det_weights.npz"))
    elif args.shapes:
        build_shapes_onnx(OUT, GOLDEN_DETECTION)
    else:
        weights = build_onnx(OUT)
        if args.tflite:
            build_tflite(OUT, weights)
    write_sums(OUT)
    for p in model_files(OUT):
        print(f"{p.relative_to(OUT)}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
