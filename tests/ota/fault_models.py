"""Real ONNX candidates that misbehave: one hangs, one allocates gigabytes, one is N x slower.

Each is the demo digits model plus a side branch whose result is added as ``0 * sum``, so
its outputs equal the digits model's (the gate's accuracy checks pass) while the extra work
hangs, exhausts memory or costs time, the way a real bad release would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO = Path(__file__).resolve().parents[2] / "agent" / "demo" / "models"


def _digits() -> onnx.ModelProto:
    return onnx.load(str(DEMO / "digits_fp32.onnx"))


def _with_side_branch(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    side_out: str,
) -> bytes:
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "digits_logits"
    g.node.extend(
        [
            *nodes,
            helper.make_node("ReduceSum", [side_out], ["side_sum"], keepdims=0),
            helper.make_node("Mul", ["side_sum", "side_zero_c"], ["side_zero"]),
            helper.make_node("Add", ["digits_logits", "side_zero"], [out]),
        ]
    )
    g.initializer.extend([*inits, numpy_helper.from_array(np.zeros((), np.float32), "side_zero_c")])
    return model.SerializeToString()


def hanging_model(trips: int = 1 << 62) -> bytes:
    """A Loop of ``trips`` trips fed from the input: with the default 2**62 the first
    inference never returns (a smaller count makes one that returns, late)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.ones((), np.float32), "one")],
    )
    model = _digits()
    inp = model.graph.input[0].name
    nodes = [
        helper.make_node("ReduceSum", [inp], ["v0"], keepdims=0),
        helper.make_node("Loop", ["trips", "cond0", "v0"], ["v_final"], body=body),
    ]
    inits = [
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond0"),
    ]
    return _with_side_branch(model, nodes, inits, "v_final")


def hungry_model(mb: int = 4096) -> bytes:
    """Expands one value of the input into ``mb`` MB of float32 on every inference."""
    model = _digits()
    inp = model.graph.input[0].name
    nodes = [
        helper.make_node("ReduceSum", [inp], ["s0"], keepdims=1),
        helper.make_node("Expand", ["s0", "big_shape"], ["big"]),
    ]
    inits = [numpy_helper.from_array(np.array([mb * (1 << 20) // 4], np.int64), "big_shape")]
    return _with_side_branch(model, nodes, inits, "big")


def heavy_model(layers: int, width: int = 512) -> bytes:
    """``layers`` MatMul+Tanh steps of ``width`` (one shared weight, so the file stays
    small): inference time grows with ``layers``; 3x the layers is a 3x slower model."""
    rng = np.random.default_rng(7)
    model = _digits()
    inp = model.graph.input[0].name
    nodes = [helper.make_node("Flatten", [inp], ["h0"], axis=1)]
    nodes.append(helper.make_node("MatMul", ["h0", "w_in"], ["h1"]))
    for i in range(1, layers + 1):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w_mid"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (64, width)).astype(np.float32), "w_in"),
        numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), "w_mid"
        ),
    ]
    return _with_side_branch(model, nodes, inits, f"h{layers + 1}")
