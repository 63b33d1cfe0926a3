"""Gate test helpers: candidate models built from the demo FP32 weights, golden sets in tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from demo_models import DIGITS_SHAPE, OPSET, MLPWeights, mlp_onnx
from onnx import TensorProto, helper, numpy_helper

# Heavy input-dependent work per row for the "slower model": big enough to stay far above
# the gate's 0.5 ms latency slack on a busy core, small enough to keep the test quick.
SLOW_MATMULS = 32
SLOW_WIDTH = 1024
BIAS_LOWERED_CLASS = 3


def slow_mlp_onnx(weights: MLPWeights, path: Path) -> Path:
    """The digits MLP plus MatMuls that depend on the input (so ORT cannot fold them away)
    whose result is multiplied by zero: the same logits, much more latency."""
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array(weights.w1.astype(np.float32), "w1"),
        numpy_helper.from_array(weights.b1.astype(np.float32), "b1"),
        numpy_helper.from_array(weights.w2.astype(np.float32), "w2"),
        numpy_helper.from_array(weights.b2.astype(np.float32), "b2"),
        numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(
            (rng.standard_normal((64, SLOW_WIDTH)) * 0.1).astype(np.float32), "heavy_in"
        ),
        numpy_helper.from_array(
            (rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) * 0.01).astype(np.float32), "heavy"
        ),
        numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["logits_raw"]),
        helper.make_node("MatMul", ["flat", "heavy_in"], ["heavy_0"]),
    ]
    for i in range(SLOW_MATMULS):
        nodes.append(helper.make_node("MatMul", [f"heavy_{i}", "heavy"], [f"heavy_{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"heavy_{SLOW_MATMULS}"], ["heavy_sum"], keepdims=0),
        helper.make_node("Mul", ["heavy_sum", "zero"], ["heavy_zero"]),
        helper.make_node("Add", ["logits_raw", "heavy_zero"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *DIGITS_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="session")
def weights(demo_models: Path) -> MLPWeights:
    return MLPWeights.load(demo_models / "digits_mlp_weights.npz")


@pytest.fixture(scope="session")
def bias_lowered_class() -> int:
    return BIAS_LOWERED_CLASS


@pytest.fixture(scope="session")
def golden_dir(repo_root: Path) -> Path:
    return repo_root / "golden_local"


@pytest.fixture(scope="session")
def variants(tmp_path_factory: pytest.TempPathFactory, weights: MLPWeights) -> dict[str, Path]:
    """Candidate models, one per reason to fail, built once for the whole session."""
    out = tmp_path_factory.mktemp("variants")
    b2 = weights.b2.copy()
    b2[BIAS_LOWERED_CLASS] -= 4.0
    lowered = MLPWeights(weights.w1, weights.b1, weights.w2, b2)
    return {
        "fp32_copy": mlp_onnx(weights, out / "fp32_copy.onnx"),
        # Logits x0.25: the same argmax, far less confident: calibration ruined.
        "scaled": mlp_onnx(weights, out / "scaled.onnx", logit_scale=0.25),
        "bias_lowered": mlp_onnx(lowered, out / "bias_lowered.onnx"),
        "slow": slow_mlp_onnx(weights, out / "slow.onnx"),
        "eleven_outputs": mlp_onnx(weights, out / "eleven.onnx", num_outputs=11),
    }


@pytest.fixture
def make_golden(tmp_path: Path, golden_dir: Path) -> Callable[..., Path]:
    """A golden set folder in tmp: the shipped arrays, with any of them replaced."""

    def build(**arrays: np.ndarray | None) -> Path:
        folder = tmp_path / "golden"
        folder.mkdir(exist_ok=True)
        for name in ("inputs", "labels", "slices"):
            arr = arrays.get(name, np.load(golden_dir / f"{name}.npy"))
            if arr is not None:
                np.save(folder / f"{name}.npy", arr, allow_pickle=False)
        for name, arr in arrays.items():
            if name not in ("inputs", "labels", "slices") and arr is not None:
                np.save(folder / f"{name}.npy", arr, allow_pickle=False)
        return folder

    return build
