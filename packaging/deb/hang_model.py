"""Writes an ONNX digits model that answers zeros at once but never returns on a real frame."""

# Used by test_under_systemd.sh to hang the daemon's frame loop inside ONNX Runtime, the way
# a bad candidate model would: warm-up feeds zero batches (BackendBase.warmup), so the
# model loads, warms and the unit reaches active; the first real frame (non-zero pixels)
# sets a Loop's trip count to ~1e15 and the run spins in ORT with the GIL released, so the
# daemon's status thread keeps running and must stop feeding the systemd watchdog itself.
# Needs the onnx package (the project's dev extra); run with the repository's .venv python.

from __future__ import annotations

import sys
from pathlib import Path


def build(out: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 10]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 10]),
        ],
    )
    const = helper.make_tensor
    nodes = [
        helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
        helper.make_node(
            "Constant", [], ["scale"], value=const("s", TensorProto.FLOAT, [], [1e15])
        ),
        helper.make_node("Mul", ["total", "scale"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["go"], value=const("g", TensorProto.BOOL, [], [1])),
        helper.make_node(
            "Constant", [], ["v0"], value=const("v", TensorProto.FLOAT, [1, 10], [0.1] * 10)
        ),
        helper.make_node("Loop", ["trips", "go", "v0"], ["logits"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_hang",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out.write_bytes(model.SerializeToString())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("Error: usage: hang_model.py OUT.onnx (packaging/deb/hang_model.py)\n")
        sys.exit(2)
    build(Path(sys.argv[1]))
