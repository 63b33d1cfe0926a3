"""The external-data check reads the protobuf wire format: same answer as the onnx package,
and it holds where onnx is not installed (a device)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import ModelError
from agent.runtime.onnx_wire import MAX_DEPTH, external_data_tensor

DEMO = Path(__file__).resolve().parents[2] / "agent" / "demo" / "models"


def _graph(name: str, weight: onnx.TensorProto) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Add", ["x", weight.name], ["y"])
    return helper.make_graph([node], name, [x], [y], [weight])


def _weight(name: str = "w", size: int = 4) -> onnx.TensorProto:
    return numpy_helper.from_array(np.arange(size, dtype=np.float32).reshape(1, size), name)


def _external(tensor: onnx.TensorProto, location: str = "../../etc/shadow") -> None:
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    tensor.ClearField("raw_data")


def plain(tmp: Path) -> onnx.ModelProto:
    return helper.make_model(_graph("plain", _weight()))


def external_initializer(tmp: Path) -> onnx.ModelProto:
    weight = _weight("secret_w")
    _external(weight)
    return helper.make_model(_graph("ext", weight))


def location_flag_only(tmp: Path) -> onnx.ModelProto:
    # data_location=EXTERNAL without the entries: still refused (ORT would look for a file)
    weight = _weight("flag_w")
    weight.data_location = TensorProto.EXTERNAL
    return helper.make_model(_graph("flag", weight))


def entries_only(tmp: Path) -> onnx.ModelProto:
    weight = _weight("entries_w")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    return helper.make_model(_graph("entries", weight))


def in_if_subgraph(tmp: Path) -> onnx.ModelProto:
    inner_w = _weight("inner_w")
    _external(inner_w)
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["inner_w"], ["out"])],
        "then",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        [inner_w],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["out"])],
        "else",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)
    return helper.make_model(helper.make_graph([node], "if", [cond, c], [out]))


def in_constant_attribute(tmp: Path) -> onnx.ModelProto:
    value = _weight("const_w")
    _external(value)
    node = helper.make_node("Constant", [], ["y"], value=value)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return helper.make_model(helper.make_graph([node], "const", [], [y]))


def in_sparse_initializer(tmp: Path) -> onnx.ModelProto:
    values = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "sparse_values")
    _external(values)
    indices = numpy_helper.from_array(np.array([0], dtype=np.int64), "sparse_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    model = helper.make_model(_graph("sparse", _weight()))
    model.graph.sparse_initializer.append(sparse)
    return model


def saved_by_onnx_external(tmp: Path) -> onnx.ModelProto:
    # the way a real exporter writes it: onnx's own helper moves big tensors out
    model = helper.make_model(_graph("big", _weight("big_w", 4096)))
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    return model


@dataclass(frozen=True)
class WireCase:
    """One model a package could carry, and what the device must say about it."""

    name: str
    build: Callable[[Path], onnx.ModelProto]
    external: str | None  # the tensor named in the refusal; None: accepted


CASES = [
    WireCase("plain model", plain, None),
    WireCase("external initializer pointing outside", external_initializer, "secret_w"),
    WireCase("data_location flag without entries", location_flag_only, "flag_w"),
    WireCase("external entries without the flag", entries_only, "entries_w"),
    WireCase("external tensor inside an If branch", in_if_subgraph, "inner_w"),
    WireCase("external tensor in a Constant attribute", in_constant_attribute, "const_w"),
    WireCase("external sparse initializer values", in_sparse_initializer, "sparse_values"),
    WireCase("exporter's external weights file", saved_by_onnx_external, "big_w"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_external_data_found_at_any_depth(tmp_path: Path, case: WireCase) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(case.build(tmp_path).SerializeToString())
    assert external_data_tensor(path) == case.external


@pytest.mark.parametrize("model", sorted(DEMO.glob("*.onnx")), ids=lambda p: p.name)
def test_shipped_models_have_no_external_data(model: Path) -> None:
    assert external_data_tensor(model) is None


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty file", b""),
        ("text", b"this is not a model\n" * 10),
        ("truncated length", b"\x3a\xff\xff\x03abc"),
        ("bad wire type", b"\x0f\x00"),
        ("overlong varint", b"\x08" + b"\xff" * 11),
    ],
)
def test_not_protobuf_is_a_model_error(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        external_data_tensor(path)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_nesting_bomb_is_refused_not_a_stack_overflow(tmp_path: Path) -> None:
    # Written on the wire by hand: protobuf's own parser gives up long before this depth.
    # graph.node(1) -> node.attribute(5) -> attribute.g(6) -> graph ..., then model.graph(7)
    graph = b""
    for _ in range(MAX_DEPTH):
        graph = _field(1, _field(5, _field(6, graph)))
    path = tmp_path / "deep.onnx"
    path.write_bytes(_field(7, graph))
    with pytest.raises(ModelError, match="nested deeper"):
        external_data_tensor(path)


def test_check_holds_without_the_onnx_package(tmp_path: Path) -> None:
    """On a device there is no `onnx`: the refusal must not depend on it."""
    path = tmp_path / "model.onnx"
    path.write_bytes(external_initializer(tmp_path).SerializeToString())
    script = f"""
import sys
sys.modules["onnx"] = None  # import onnx now raises ImportError, as on a device
from pathlib import Path
from agent.errors import ModelError
from agent.runtime import load_backend
try:
    load_backend(Path({str(path)!r}))
except ModelError as exc:
    print("refused:", exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "refused:" in done.stdout and "secret_w" in done.stdout, done.stdout + done.stderr
