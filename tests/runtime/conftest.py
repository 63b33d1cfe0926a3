"""Helpers for the runtime tests: model variants written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits_rows(demo_models: Path) -> np.ndarray:
    """The 64 golden rows TensorFlow's reference outputs were computed on."""
    return np.load(demo_models / "reference" / "tflite_inputs.npy")


@pytest.fixture()
def fixed_batch_onnx(tmp_path: Path, demo_models: Path) -> Path:
    """The FP32 digits model with its batch dimension pinned to 1."""
    import onnx

    model = onnx.load(str(demo_models / "digits_fp32.onnx"))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed_batch.onnx"
    onnx.save(model, str(path))
    return path
