"""Builders for the demo models: ONNX graphs from numpy weights, for the build script and tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
DIGITS_SHAPE = (1, 8, 8)
CNN_SHAPE = (3, 224, 224)
NUM_CLASSES = 10


@dataclass(frozen=True)
class MLPWeights:
    """A 64 -> hidden -> 10 MLP on 8x8 digit images (flattened)."""

    w1: np.ndarray  # (64, hidden)
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (hidden, classes)
    b2: np.ndarray  # (classes,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x.reshape(len(x), -1) @ self.w1 + self.b1, 0.0)
        return h @ self.w2 + self.b2

    def save(self, path: Path) -> None:
        np.savez(path, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    @classmethod
    def load(cls, path: Path) -> MLPWeights:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["w1"], z["b1"], z["w2"], z["b2"])


def _f32(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def mlp_onnx(
    weights: MLPWeights,
    path: Path,
    *,
    logit_scale: float = 1.0,
    extra_matmuls: int = 0,
    num_outputs: int | None = None,
    name: str = "digits_mlp",
) -> Path:
    """Write the digits MLP as ONNX: input [N,1,8,8] float32 -> logits [N,classes].

    Variants for gate tests: ``logit_scale`` multiplies the logits (same argmax, ruined
    calibration); ``extra_matmuls`` adds heavy no-op work (a slower model); ``num_outputs``
    truncates or pads the classes (a model with a different output size).
    """
    w2, b2 = weights.w2, weights.b2
    if num_outputs is not None and num_outputs != w2.shape[1]:
        if num_outputs < w2.shape[1]:
            w2, b2 = w2[:, :num_outputs], b2[:num_outputs]
        else:
            pad = num_outputs - w2.shape[1]
            w2 = np.concatenate([w2, np.zeros((w2.shape[0], pad))], axis=1)
            b2 = np.concatenate([b2, np.full(pad, -10.0)])
    classes = w2.shape[1]
    inits = [
        _f32("w1", weights.w1),
        _f32("b1", weights.b1),
        _f32("w2", w2 * logit_scale),
        _f32("b2", b2 * logit_scale),
        numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["logits_raw"]),
    ]
    last = "logits_raw"
    if extra_matmuls:
        # Heavy work whose result is multiplied by zero: same outputs, more latency.
        rng = np.random.default_rng(7)
        inits.append(_f32("heavy", rng.standard_normal((512, 512)) * 0.01))
        inits.append(_f32("heavy_in", rng.standard_normal((64, 512))))
        inits.append(_f32("zero", np.zeros((1,))))
        prev = "heavy_in"
        for i in range(extra_matmuls):
            nodes.append(helper.make_node("MatMul", [prev, "heavy"], [f"heavy_{i}"]))
            prev = f"heavy_{i}"
        nodes.append(helper.make_node("ReduceSum", [prev], ["heavy_sum"], keepdims=0))
        nodes.append(helper.make_node("Mul", ["heavy_sum", "zero"], ["heavy_zero"]))
        nodes.append(helper.make_node("Add", [last, "heavy_zero"], ["logits_heavy"]))
        last = "logits_heavy"
    nodes.append(helper.make_node("Identity", [last], ["logits"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *DIGITS_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "edge-agent tools/demo_models.py"
    return _save(model, path)


def train_digits_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 32, seed: int = 0) -> MLPWeights:
    """Train the MLP with scikit-learn (deterministic for a given seed)."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        activation="relu",
        max_iter=400,
        random_state=seed,
        alpha=1e-3,
    )
    clf.fit(x.reshape(len(x), -1), y)
    w1, w2 = clf.coefs_
    b1, b2 = clf.intercepts_
    return MLPWeights(
        w1.astype(np.float32), b1.astype(np.float32), w2.astype(np.float32), b2.astype(np.float32)
    )


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as [N,1,8,8] float32 in [0,1].

    Returns (train_x, train_y, golden_x, golden_y): rows with index % 5 == 0 are kept
    out of training for the device's golden set.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32).reshape(-1, *DIGITS_SHAPE)
    y = data.target.astype(np.int64)
    idx = np.arange(len(x))
    golden = idx % 5 == 0
    return x[~golden], y[~golden], x[golden], y[golden]


def cnn_onnx(path: Path, seed: int = 0, widths: Sequence[int] = (64, 128, 256, 512, 1024)) -> Path:
    """A MobileNet-like CNN with fixed-seed weights: input [N,3,224,224] -> logits [N,10].

    Stem conv 3x3/2, then depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, ReLU),
    global average pooling and a linear classifier. Used for realistic latency figures.
    """
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(inp: str, out: str, cin: int, cout: int, k: int, stride: int, group: int) -> None:
        fan_in = (cin // group) * k * k
        w = rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        b = rng.standard_normal(cout) * 0.01
        inits.extend([_f32(f"{out}_w", w), _f32(f"{out}_b", b)])
        nodes.append(
            helper.make_node(
                "Conv",
                [inp, f"{out}_w", f"{out}_b"],
                [f"{out}_c"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        nodes.append(helper.make_node("Relu", [f"{out}_c"], [out]))

    conv("input", "stem", 3, widths[0], 3, 2, 1)
    prev, cin = "stem", widths[0]
    for i, cout in enumerate(widths):
        for j, stride in enumerate((1, 2) if i < len(widths) - 1 else (1,)):
            name = f"b{i}_{j}"
            conv(prev, f"{name}_dw", cin, cin, 3, stride, cin)
            conv(f"{name}_dw", f"{name}_pw", cin, cout, 1, 1, 1)
            prev, cin = f"{name}_pw", cout
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pooled"]))
    inits.append(numpy_helper.from_array(np.array([-1, cin], dtype=np.int64), "flat_shape"))
    nodes.append(helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]))
    inits.append(_f32("fc_w", rng.standard_normal((cin, NUM_CLASSES)) * np.sqrt(1.0 / cin)))
    inits.append(_f32("fc_b", np.zeros(NUM_CLASSES)))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["fc_mm"]))
    nodes.append(helper.make_node("Add", ["fc_mm", "fc_b"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "cnn_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *CNN_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "edge-agent tools/demo_models.py"
    return _save(model, path)


def quantize_onnx_static(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """Static INT8 quantization in QDQ format, calibrated on ``calibration`` rows."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, rows: np.ndarray):
            self._it = iter([{"input": rows[i : i + 16]} for i in range(0, len(rows), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src),
        str(dst),
        _Reader(calibration.astype(np.float32)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    return dst
