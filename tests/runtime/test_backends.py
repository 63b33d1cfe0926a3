"""Every backend on the committed demo models, against bare runtimes and TensorFlow's references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import BackendUnavailableError, InputDataError, ModelError
from agent.runtime import BackendOptions, load_backend
from agent.runtime.base import Quantization
from agent.runtime.litert import LiteRTBackend, find_interpreter
from agent.runtime.onnx import OnnxBackend


def _bare_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["digits_fp32.onnx", "digits_int8.onnx", "cnn_int8.onnx"])
def test_onnx_matches_bare_session(name: str, demo_models: Path) -> None:
    path = demo_models / name
    backend = load_backend(path)
    assert isinstance(backend, OnnxBackend)
    bare = _bare_session(path)
    shape = [4, *[d for d in backend.inputs[0].shape[1:] if d is not None]]
    x = np.random.default_rng(3).uniform(0, 1, shape).astype(np.float32)
    (want,) = bare.run(None, {"input": x})
    (got,) = backend.run(x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(backend.predict(x), want)


def test_onnx_session_has_spinning_off_and_threads_set(demo_models: Path) -> None:
    backend = load_backend(
        demo_models / "digits_fp32.onnx", options=BackendOptions(intra_op_threads=2)
    )
    assert isinstance(backend, OnnxBackend)
    so = backend.session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    info = backend.describe()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["inputs"][0]["shape"] == [None, 1, 8, 8]


def test_litert_fp32_matches_tensorflow_reference(
    demo_models: Path, digits_rows: np.ndarray
) -> None:
    ref = np.load(demo_models / "reference" / "digits_fp32_tflite_out.npy")
    backend = load_backend(demo_models / "digits_fp32.tflite")
    assert isinstance(backend, LiteRTBackend)
    np.testing.assert_allclose(backend.predict(digits_rows), ref, atol=1e-5, rtol=0)
    rows = np.concatenate([backend.run(digits_rows[i : i + 1])[0] for i in range(8)])
    np.testing.assert_allclose(rows, ref[:8], atol=1e-5, rtol=0)


def test_litert_int8_matches_tensorflow_reference_exactly(
    demo_models: Path, digits_rows: np.ndarray
) -> None:
    raw = np.load(demo_models / "reference" / "digits_int8_tflite_out.npy")
    assert raw.dtype == np.int8
    backend = load_backend(demo_models / "digits_int8.tflite")
    in_spec, out_spec = backend.inputs[0], backend.outputs[0]
    assert in_spec.dtype == "int8" and in_spec.quantization is not None
    assert out_spec.quantization is not None
    want = out_spec.quantization.dequantize(raw)
    # Whole batch (the interpreter is resized) and one row at a time give the same bytes.
    np.testing.assert_array_equal(backend.predict(digits_rows), want)
    rows = np.concatenate([backend.run(digits_rows[i : i + 1])[0] for i in range(len(raw))])
    np.testing.assert_array_equal(rows, want)


def test_int8_models_agree_with_fp32_on_top1(demo_models: Path, digits_rows: np.ndarray) -> None:
    fp32 = load_backend(demo_models / "digits_fp32.onnx").predict(digits_rows).argmax(1)
    for name in ("digits_int8.onnx", "digits_int8.tflite", "digits_fp32.tflite"):
        other = load_backend(demo_models / name).predict(digits_rows).argmax(1)
        assert (other == fp32).mean() >= 0.95, name


def test_fixed_batch_model_runs_row_by_row(fixed_batch_onnx: Path, digits_rows: np.ndarray) -> None:
    backend = load_backend(fixed_batch_onnx)
    assert backend.max_batch() == 1
    out = backend.predict(digits_rows[:5])
    bare = _bare_session(fixed_batch_onnx)
    want = np.concatenate([bare.run(None, {"input": digits_rows[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_array_equal(out, want)


def test_quantization_round_trip_saturates() -> None:
    q = Quantization(scale=0.5, zero_point=-10)
    x = np.array([-1000.0, -1.0, 0.0, 0.5, 1000.0], dtype=np.float32)
    ints = q.quantize(x, np.dtype(np.int8))
    assert ints.tolist() == [-128, -12, -10, -9, 127]
    np.testing.assert_array_equal(q.dequantize(ints), [-59.0, -1.0, 0.0, 0.5, 68.5])


def test_interpreter_preference_order_falls_back() -> None:
    _cls, module = find_interpreter(
        (
            ("no_such_runtime.interpreter", "Interpreter"),
            ("ai_edge_litert.interpreter", "Interpreter"),
        )
    )
    assert module == "ai_edge_litert.interpreter"
    with pytest.raises(BackendUnavailableError, match="litert"):
        find_interpreter((("no_such_runtime.interpreter", "Interpreter"),))


# ---- bad input ----


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_backend(tmp_path / "nope.onnx")


@pytest.mark.parametrize("name", ["digits_fp32.onnx", "digits_fp32.tflite"])
def test_truncated_model(name: str, tmp_path: Path, demo_models: Path) -> None:
    data = (demo_models / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cannot load|not a valid"):
        load_backend(path)


def test_text_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ModelError):
        load_backend(path)
    odd = tmp_path / "model.bin"
    odd.write_text("hello")
    with pytest.raises(ModelError, match="unknown model type"):
        load_backend(odd)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError):
        load_backend(path)


def test_input_shape_mismatch(demo_models: Path) -> None:
    backend = load_backend(demo_models / "digits_fp32.onnx")
    with pytest.raises(InputDataError, match=r"expects shape \(N, 1, 8, 8\), got \(3, 1, 8, 9\)"):
        backend.predict(np.zeros((3, 1, 8, 9), dtype=np.float32))
    with pytest.raises(InputDataError, match="expects rank 4"):
        backend.predict(np.zeros((3, 64), dtype=np.float32))


def test_onnx_with_external_data_is_refused(tmp_path: Path, demo_models: Path) -> None:
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(demo_models / "digits_fp32.onnx"))
    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match="external data"):
        load_backend(path)
