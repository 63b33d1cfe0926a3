"""Native TensorRT backend: builds engines from ONNX at install time and caches them per device.

Only the engine-cache keys, GPU detection and fallback are exercised without a GPU; the
build and run paths follow the TensorRT 10 Python API (tensor-address execution,
``execute_async_v3``) with cuda-python for device memory, and have to be validated on a
Jetson or a CUDA machine (see docs/jetson.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendUnavailableError, ModelError, RuntimeFaultError
from agent.runtime.base import (
    AnyArray,
    Backend,
    BackendOptions,
    TensorSpec,
    check_model_file,
    file_sha256,
)
from agent.textio import write_atomic

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_BYTES = 256 << 20


def import_tensorrt() -> Any:
    """Import the TensorRT Python bindings or say what to install."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed here ({exc}); on a Jetson use the JetPack "
            "python3-libnvinfer package, elsewhere the 'tensorrt' extra"
        ) from None


def import_cudart() -> Any:
    """cuda-python's runtime module, under its new or old import path."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    raise BackendUnavailableError("cuda-python is not installed (pip install cuda-python)")


def detect_gpu_name(proc_root: Path = Path("/proc")) -> str | None:
    """The GPU's model name from the driver's procfs files (desktop) or the device tree (Jetson)."""
    gpus = sorted((proc_root / "driver" / "nvidia" / "gpus").glob("*/information"))
    for info in gpus:
        try:
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    model = proc_root / "device-tree" / "model"
    try:
        text = model.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return None
    return text if "nvidia" in text.lower() or "jetson" in text.lower() else None


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on: a change to any of them needs a rebuild."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str

    def digest(self) -> str:
        raw = "|".join((self.model_sha256, self.tensorrt_version, self.gpu_name, self.precision))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def filename(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        return f"{gpu}-{self.precision}-{self.digest()}.engine"


def engine_key(model_path: Path, tensorrt_version: str, gpu_name: str, precision: str) -> EngineKey:
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return EngineKey(file_sha256(model_path), tensorrt_version, gpu_name, precision)


def cached_engine_path(cache_dir: Path, key: EngineKey) -> Path:
    return cache_dir / key.filename()


def find_cached_engine(cache_dir: Path, key: EngineKey) -> Path | None:
    """A cached engine for exactly this key, or None. Its sidecar must agree with the key."""
    path = cached_engine_path(cache_dir, key)
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return None
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return path if recorded == key.__dict__ else None


def build_engine(
    onnx_path: Path,
    cache_dir: Path,
    precision: str = "fp16",
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Build (or reuse) a serialized engine for this device; called at install time."""
    trt = import_tensorrt()
    gpu = detect_gpu_name() or "unknown-gpu"
    key = engine_key(onnx_path, str(trt.__version__), gpu, precision)
    cached = find_cached_engine(cache_dir, key)
    if cached is not None:
        log.info("tensorrt: reusing cached engine %s", cached.name)
        return cached
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if (
        hasattr(trt, "NetworkDefinitionCreationFlag")
        and int(str(trt.__version__).split(".")[0]) < 10
    ):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        # Explicit quantization: the QDQ nodes of the ONNX model carry the scales.
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if dims and dims[0] < 0:
            rest = [d if d > 0 else 1 for d in dims[1:]]
            profile.set_shape(tensor.name, [1, *rest], [1, *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT failed to build an engine")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cached_engine_path(cache_dir, key)
    write_atomic(path, bytes(serialized))
    write_atomic(path.with_suffix(".json"), json.dumps(key.__dict__).encode())
    log.info("tensorrt: built %s engine %s", precision, path.name)
    return path


def _check_cuda(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeFaultError(f"CUDA call failed with error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend(Backend):
    """A serialized TensorRT engine (built from ONNX with ``build_engine`` or given directly)."""

    name = "tensorrt"

    def __init__(self, path: Path, options: BackendOptions | None = None):
        options = options or BackendOptions()
        check_model_file(path)
        trt = import_tensorrt()
        self._cudart = import_cudart()
        if path.suffix == ".onnx":
            cache = options.engine_cache_dir or path.parent / ".engine-cache"
            engine_path = build_engine(path, cache, options.precision)
        else:
            engine_path = path
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise ModelError(f"{engine_path}: not an engine for this TensorRT and GPU")
        self._trt = trt
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _check_cuda(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}
        self._precision = options.precision
        self._engine_path = engine_path
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
            shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name=name, dtype=dtype, shape=shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        super().__init__(path, inputs, outputs)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check_cuda(self._cudart.cudaFree(ptr))
            ptr = int(_check_cuda(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, x: AnyArray) -> list[AnyArray]:
        cudart = self._cudart
        spec = self.inputs[0]
        x = np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))
        self._context.set_input_shape(spec.name, x.shape)
        ptr = self._buffer(spec.name, x.nbytes)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check_cuda(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self._stream))
        self._context.set_tensor_address(spec.name, ptr)
        results: list[tuple[AnyArray, int]] = []
        for out in self.outputs:
            shape = tuple(self._context.get_tensor_shape(out.name))
            host = np.empty(shape, dtype=np.dtype(out.dtype))
            optr = self._buffer(out.name, host.nbytes)
            self._context.set_tensor_address(out.name, optr)
            results.append((host, optr))
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeFaultError(f"{self.path}: TensorRT execution failed")
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for host, optr in results:
            _check_cuda(
                cudart.cudaMemcpyAsync(host.ctypes.data, optr, host.nbytes, d2h, self._stream)
            )
        _check_cuda(cudart.cudaStreamSynchronize(self._stream))
        return [h.astype(np.float32, copy=False) for h, _ in results]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._context = None
        self._engine = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "runtime": f"tensorrt {self._trt.__version__}",
            "model": str(self.path),
            "engine": str(self._engine_path),
            "provider": detect_gpu_name() or "cuda",
            "precision": self._precision,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }
