#!/usr/bin/env python3
"""Build the demo models reproducibly into agent/demo/models/ (ONNX always, TFLite with TensorFlow).

Usage:
  python tools/build_demo_models.py            # ONNX models; keeps committed .tflite files
  python tools/build_demo_models.py --tflite   # also TFLite + TensorFlow reference outputs
                                               # (needs tensorflow-cpu; run once, commit)
  python tools/build_demo_models.py --check    # verify committed files against SHA256SUMS

The digits classifier is trained on scikit-learn's bundled digits data (no download), the
CNN has fixed-seed weights. The TFLite conversion needs TensorFlow, which the agent never
depends on: the small .tflite files and their TensorFlow reference outputs are committed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import demo_models as dm  # noqa: E402

OUT = HERE.parent / "agent" / "demo" / "models"
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
    args = parser.parse_args()
    if args.check:
        return check_sums(OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    weights = build_onnx(OUT)
    if args.tflite:
        build_tflite(OUT, weights)
    write_sums(OUT)
    for p in model_files(OUT):
        print(f"{p.relative_to(OUT)}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
