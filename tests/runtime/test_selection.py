"""Backend and provider selection, TensorRT engine-cache keys and fallback (no GPU needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.errors import BackendUnavailableError, ModelError
from agent.runtime import installed_runtimes, load_backend, select_backend
from agent.runtime.base import BackendOptions
from agent.runtime.onnx import CPU_EP, CUDA_EP, TRT_EP, choose_providers, provider_options
from agent.runtime.tensorrt import (
    EngineKey,
    detect_gpu_name,
    engine_key,
    find_cached_engine,
    import_tensorrt,
)


@pytest.mark.parametrize(
    ("filename", "requested", "installed", "want"),
    [
        ("m.onnx", "auto", {"onnx"}, "onnx"),
        ("m.onnx", "auto", {"onnx", "tensorrt", "litert"}, "onnx"),
        ("m.onnx", "auto", {"tensorrt"}, "tensorrt"),
        ("m.onnx", "tensorrt", {"onnx", "tensorrt"}, "tensorrt"),
        ("m.tflite", "auto", {"onnx", "litert"}, "litert"),
        ("m.engine", "auto", {"tensorrt"}, "tensorrt"),
        ("m.plan", "tensorrt", {"tensorrt"}, "tensorrt"),
    ],
)
def test_select_backend(filename: str, requested: str, installed: set[str], want: str) -> None:
    name, reason = select_backend(Path(filename), requested, installed)
    assert name == want
    assert reason


@pytest.mark.parametrize(
    ("filename", "requested", "installed", "error", "fragment"),
    [
        ("m.tflite", "auto", {"onnx"}, BackendUnavailableError, "litert"),
        ("m.engine", "auto", {"onnx"}, BackendUnavailableError, "TensorRT"),
        ("m.onnx", "tensorrt", {"onnx"}, BackendUnavailableError, "not installed"),
        ("m.onnx", "litert", {"onnx", "litert"}, ModelError, "cannot run on the litert"),
        ("m.onnx", "cuda", {"onnx"}, BackendUnavailableError, "unknown backend"),
        ("m.onnx", "auto", set(), BackendUnavailableError, "no runtime"),
    ],
)
def test_select_backend_refusals(
    filename: str, requested: str, installed: set[str], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        select_backend(Path(filename), requested, installed)


def test_tflite_sniffed_without_suffix(tmp_path: Path, demo_models: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes((demo_models / "digits_fp32.tflite").read_bytes())
    assert select_backend(path, "auto", {"litert"})[0] == "litert"


def test_installed_runtimes_reports_what_imports() -> None:
    have = installed_runtimes()
    assert "onnx" in have and "litert" in have
    assert installed_runtimes(lambda name: name == "tflite_runtime") == {"litert"}


def test_provider_order_auto() -> None:
    chosen, reasons = choose_providers(("auto",), [TRT_EP, CUDA_EP, CPU_EP])
    assert chosen == [TRT_EP, CUDA_EP, CPU_EP] and reasons == []
    chosen, reasons = choose_providers(("auto",), [CUDA_EP, CPU_EP])
    assert chosen == [CUDA_EP, CPU_EP]
    assert any(TRT_EP in r for r in reasons)
    chosen, reasons = choose_providers(("auto",), ["AzureExecutionProvider", CPU_EP])
    assert chosen == [CPU_EP] and len(reasons) == 2


def test_explicit_provider_that_is_missing_is_an_error() -> None:
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available"):
        choose_providers(("cuda",), [CPU_EP])
    assert choose_providers(("cpu",), [CPU_EP])[0] == [CPU_EP]


def test_unavailable_provider_fails_loading(demo_models: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        load_backend(
            demo_models / "digits_fp32.onnx", options=BackendOptions(providers=("tensorrt",))
        )


def test_provider_options_for_tensorrt_and_cuda(tmp_path: Path) -> None:
    opts = BackendOptions(engine_cache_dir=tmp_path, precision="fp16", gpu_mem_limit_bytes=1 << 30)
    trt = provider_options(TRT_EP, opts)
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_fp16_enable"] == "True"
    assert "trt_int8_enable" not in trt
    cuda = provider_options(CUDA_EP, opts)
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda["gpu_mem_limit"] == str(1 << 30)
    assert provider_options(CPU_EP, opts) == {}


def test_engine_key_changes_with_every_part(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model-bytes")
    base = engine_key(model, "10.3.0", "NVIDIA Orin", "fp16")
    assert base.model_sha256 == hashlib.sha256(b"model-bytes").hexdigest()
    variants = [
        engine_key(model, "10.4.0", "NVIDIA Orin", "fp16"),
        engine_key(model, "10.3.0", "NVIDIA H100", "fp16"),
        engine_key(model, "10.3.0", "NVIDIA Orin", "int8"),
    ]
    model.write_bytes(b"other-model-bytes")
    variants.append(engine_key(model, "10.3.0", "NVIDIA Orin", "fp16"))
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 5
    assert base.filename().startswith("nvidia-orin-fp16-") and base.filename().endswith(".engine")
    with pytest.raises(ModelError, match="precision"):
        engine_key(model, "10.3.0", "NVIDIA Orin", "fp8")


def test_cached_engine_lookup_checks_the_sidecar(tmp_path: Path) -> None:
    key = EngineKey("ab" * 32, "10.3.0", "NVIDIA Orin", "fp16")
    assert find_cached_engine(tmp_path, key) is None
    engine = tmp_path / key.filename()
    engine.write_bytes(b"serialized")
    assert find_cached_engine(tmp_path, key) is None  # no sidecar: not trusted
    engine.with_suffix(".json").write_text(json.dumps(key.__dict__))
    assert find_cached_engine(tmp_path, key) == engine
    other = EngineKey("ab" * 32, "10.3.0", "NVIDIA Orin", "int8")
    assert find_cached_engine(tmp_path, other) is None


def test_detect_gpu_name_from_fake_proc(tmp_path: Path) -> None:
    assert detect_gpu_name(tmp_path) is None
    tree = tmp_path / "device-tree"
    tree.mkdir()
    (tree / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert detect_gpu_name(tmp_path) == "NVIDIA Jetson Orin Nano Developer Kit"
    (tree / "model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect_gpu_name(tmp_path) is None
    info = tmp_path / "driver" / "nvidia" / "gpus" / "0000:01:00.0"
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 12\n")
    assert detect_gpu_name(tmp_path) == "NVIDIA H100 80GB HBM3"


def test_tensorrt_missing_gives_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        assert "TensorRT is not installed" in str(exc)
    else:  # pragma: no cover - only on a machine with TensorRT
        pytest.skip("TensorRT is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(BackendUnavailableError):
        load_backend(engine)
    with pytest.raises(BackendUnavailableError):
        load_backend(engine, "tensorrt")
