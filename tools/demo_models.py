"""Builders for the demo models: ONNX graphs from numpy weights, for the build script and tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def quantize_onnx_static(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    op_types: Sequence[str] | None = None,
    per_channel: bool = False,
    exclude: Sequence[str] = (),
) -> Path:
    """Static INT8 quantization in QDQ format, calibrated on ``calibration`` rows
    (``op_types``: only these operators, e.g. the detector's convolutions)."""
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
        per_channel=per_channel,
        op_types_to_quantize=list(op_types) if op_types else None,
        nodes_to_exclude=list(exclude),
    )
    return dst


# ---------------------------------------------------------------------------------------
# The synthetic-shapes detector: a YOLO-style grid detector fitted with scikit-learn
# ---------------------------------------------------------------------------------------

SHAPES_INPUT = (1, 64, 64)
SHAPES_GRID = 8  # 8x8 cells of 8x8 pixels
SHAPES_CLASSES = 3
# Each cell sees a 32x32-pixel window around it (16x16 after the 2x2 average pool): the
# first conv's kernel is the MLP's first layer, applied at every cell.
_POOLED = 32
_KERNEL, _STRIDE, _PAD = 16, 4, 6
_FEATURE_MEAN, _FEATURE_STD = 0.3, 0.3


@dataclass(frozen=True)
class ShapesDetWeights:
    """A per-cell MLP for the classes (background + 3 shapes, softmax) and a ridge box head
    (tx, ty, tw, th) reading both the MLP's hidden units and the cell's window."""

    cls_w1: np.ndarray  # (256, hidden)
    cls_b1: np.ndarray
    cls_w2: np.ndarray  # (hidden, 4)
    cls_b2: np.ndarray
    box_wh: np.ndarray  # (hidden, 4)
    box_wx: np.ndarray  # (256, 4)
    box_b: np.ndarray  # (4,)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> ShapesDetWeights:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


def shapes_inputs(frames: Sequence[Any]) -> np.ndarray:
    """Frames as the detector's input [N, 1, 64, 64] float32 in [0, 1] (pixels / 255)."""
    x = np.stack([f.pixels for f in frames]).astype(np.float32) / 255.0
    return x[:, None]


def _cell_patches(inputs: np.ndarray) -> np.ndarray:
    """Every cell's window as a feature row [N, 8, 8, 256], as the first conv sees it."""
    n = len(inputs)
    pooled = inputs[:, 0].reshape(n, _POOLED, 2, _POOLED, 2).mean(axis=(2, 4))
    pad = np.pad(pooled, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    g = SHAPES_GRID
    out = np.empty((n, g, g, _KERNEL * _KERNEL), np.float32)
    for r in range(g):
        for c in range(g):
            window = pad[
                :, _STRIDE * r : _STRIDE * r + _KERNEL, _STRIDE * c : _STRIDE * c + _KERNEL
            ]
            out[:, r, c] = window.reshape(n, -1)
    return (out - _FEATURE_MEAN) / _FEATURE_STD


def _cell_targets(frames: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: class id (0 background, 1 + shape) and box (tx, ty in the cell, w/64, h/64)."""
    g = SHAPES_GRID
    cell = 64 // g
    cls = np.zeros((len(frames), g, g), np.int64)
    box = np.zeros((len(frames), g, g, 4), np.float32)
    for i, f in enumerate(frames):
        for b, k in zip(f.boxes, f.classes):
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            r, c = int(cy // cell), int(cx // cell)
            cls[i, r, c] = int(k) + 1
            box[i, r, c] = [cx / cell - c, cy / cell - r, (b[2] - b[0]) / 64, (b[3] - b[1]) / 64]
    return cls, box


def train_shapes_detector(
    frames: Sequence[Any], hidden: int = 64, seed: int = 0, epochs: int = 40
) -> ShapesDetWeights:
    """Fit the class MLP with scikit-learn (fixed seed) on every cell holding an object, its
    8 neighbours (the hard negatives) and random background cells; then the box head in
    closed form (ridge regression) on the cells holding an object."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x = _cell_patches(shapes_inputs(frames))
    cls, box = _cell_targets(frames)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_cls = cls.reshape(-1)
    flat_box = box.reshape(-1, 4)
    occupied = cls > 0
    near = np.zeros_like(occupied)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= np.roll(np.roll(occupied, dr, 1), dc, 2)
    rng = np.random.default_rng(seed)
    background = np.flatnonzero(flat_cls == 0)
    rows = np.unique(
        np.concatenate(
            [
                np.flatnonzero(near.reshape(-1)),
                rng.choice(background, min(len(background), 4000), replace=False),
            ]
        )
    )
    clf = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        max_iter=epochs,
        random_state=seed,
        alpha=1e-4,
        batch_size=256,
    )
    with warnings.catch_warnings():
        # a fixed, small number of epochs keeps the build quick; it need not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(flat_x[rows], flat_cls[rows])
    w1, b1 = clf.coefs_[0], clf.intercepts_[0]
    pos = np.flatnonzero(flat_cls > 0)
    px = flat_x[pos].astype(np.float64)
    features = np.concatenate([np.maximum(px @ w1 + b1, 0.0), px, np.ones((len(pos), 1))], axis=1)
    ridge = 1e-2 * np.eye(features.shape[1])
    beta = np.linalg.solve(features.T @ features + ridge, features.T @ flat_box[pos])
    f32 = np.float32
    return ShapesDetWeights(
        w1.astype(f32),
        b1.astype(f32),
        clf.coefs_[1].astype(f32),
        clf.intercepts_[1].astype(f32),
        beta[:hidden].astype(f32),
        beta[hidden : hidden + px.shape[1]].astype(f32),
        beta[-1].astype(f32),
    )


def shapes_det_onnx(
    weights: ShapesDetWeights,
    path: Path,
    *,
    lowered_class: int | None = None,
    lowered_factor: float = 0.2,
    name: str = "shapes_det",
) -> Path:
    """Write the detector as ONNX: input [N,1,64,64] -> output [N,64,8] in the `yolo` layout
    (cx, cy, w, h as 0..1 shares of the frame, objectness, 3 class scores; score =
    objectness x class).

    ``lowered_class`` multiplies that class's scores by ``lowered_factor`` (the "bad"
    candidate the gate must refuse, naming the class)."""
    g = SHAPES_GRID
    k = _KERNEL
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def window_conv(prefix: str, w1: np.ndarray, b1: np.ndarray) -> str:
        # a cell's window (x - mean) / std times w1, the normalisation folded in:
        # w' = w / std, b' = b - sum(w) * mean / std
        w = (w1 / _FEATURE_STD).T.reshape(-1, 1, k, k)
        b = b1 - (w1.sum(axis=0) * _FEATURE_MEAN / _FEATURE_STD)
        inits.extend([_f32(f"{prefix}_w1", w), _f32(f"{prefix}_b1", b)])
        nodes.append(
            helper.make_node(
                "Conv",
                ["pooled", f"{prefix}_w1", f"{prefix}_b1"],
                [f"{prefix}_c1"],
                name=f"{prefix}_conv1",
                kernel_shape=[k, k],
                strides=[_STRIDE, _STRIDE],
                pads=[_PAD] * 4,
            )
        )
        return f"{prefix}_c1"

    def first_conv(prefix: str, w1: np.ndarray, b1: np.ndarray) -> str:
        nodes.append(helper.make_node("Relu", [window_conv(prefix, w1, b1)], [f"{prefix}_h"]))
        return f"{prefix}_h"

    def head(prefix: str, hidden: str, w2: np.ndarray, b2: np.ndarray) -> str:
        inits.extend([_f32(f"{prefix}_w2", w2.T[:, :, None, None]), _f32(f"{prefix}_b2", b2)])
        nodes.append(
            helper.make_node(
                "Conv",
                [hidden, f"{prefix}_w2", f"{prefix}_b2"],
                [f"{prefix}_out"],
                name=f"{prefix}_conv2",
                kernel_shape=[1, 1],
            )
        )
        return f"{prefix}_out"

    nodes.append(
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2])
    )
    hidden = first_conv("cls", weights.cls_w1, weights.cls_b1)
    cls_logits = head("cls", hidden, weights.cls_w2, weights.cls_b2)
    # box = hidden units x box_wh + window x box_wx + box_b (two convs, summed)
    box_h = head("boxh", hidden, weights.box_wh, weights.box_b)
    box_x = window_conv("boxx", weights.box_wx, np.zeros(4, np.float32))
    nodes.append(helper.make_node("Add", [box_h, box_x], ["box_raw"]))
    box_raw = "box_raw"
    nodes.append(helper.make_node("Softmax", [cls_logits], ["probs"], axis=1))
    # objectness = 1 - p(background); class score = p(class) / objectness
    inits.append(numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "split_13"))
    nodes.append(helper.make_node("Split", ["probs", "split_13"], ["p_bg", "p_cls"], axis=1))
    inits.append(_f32("one", np.ones((1,))))
    inits.append(_f32("eps", np.full((1,), 1e-6)))
    nodes.append(helper.make_node("Sub", ["one", "p_bg"], ["objectness"]))
    nodes.append(helper.make_node("Max", ["objectness", "eps"], ["obj_safe"]))
    nodes.append(helper.make_node("Div", ["p_cls", "obj_safe"], ["cls_scores"]))
    scores = "cls_scores"
    if lowered_class is not None:
        factor = np.ones((1, SHAPES_CLASSES, 1, 1))
        factor[0, lowered_class] = lowered_factor
        inits.append(_f32("lowered", factor))
        nodes.append(helper.make_node("Mul", ["cls_scores", "lowered"], ["cls_lowered"]))
        scores = "cls_lowered"
    # boxes as 0..1 shares of the frame (box_units: normalized): centre = (cell + t) / 8,
    # size = t (the MLP was fitted to w/64, h/64)
    rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    inits.append(_f32("grid", np.stack([cc, rr])[None]))
    inits.append(numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "split_22"))
    nodes.append(helper.make_node("Split", [box_raw, "split_22"], ["t_xy", "t_wh"], axis=1))
    inits.append(_f32("per_cell", np.full((1,), 1.0 / g)))
    nodes.append(helper.make_node("Add", ["t_xy", "grid"], ["xy_cells"]))
    nodes.append(helper.make_node("Mul", ["xy_cells", "per_cell"], ["xy"]))
    nodes.append(
        helper.make_node("Concat", ["xy", "t_wh", "objectness", scores], ["grid_out"], axis=1)
    )
    inits.append(
        numpy_helper.from_array(np.array([0, 5 + SHAPES_CLASSES, g * g], dtype=np.int64), "flat")
    )
    nodes.append(helper.make_node("Reshape", ["grid_out", "flat"], ["rows_t"]))
    nodes.append(helper.make_node("Transpose", ["rows_t"], ["output"], perm=[0, 2, 1]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SHAPES_INPUT])],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, ["N", g * g, 5 + SHAPES_CLASSES]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "edge-agent tools/demo_models.py"
    return _save(model, path)
