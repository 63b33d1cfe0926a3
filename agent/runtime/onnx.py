"""ONNX Runtime backend: TensorRT EP -> CUDA EP -> CPU, no thread spinning, bounded arenas."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendUnavailableError, InputDataError, ModelError, RuntimeFaultError
from agent.runtime.base import AnyArray, Backend, BackendOptions, TensorSpec, check_model_file

log = logging.getLogger(__name__)

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
AUTO_ORDER = (TRT_EP, CUDA_EP, CPU_EP)
PROVIDER_ALIASES = {"tensorrt": TRT_EP, "trt": TRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc})") from None
    return onnxruntime


def choose_providers(
    requested: Sequence[str], available: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Pick execution providers in preference order.

    Returns (chosen, reasons): ``chosen`` always ends with the CPU provider; ``reasons``
    says, for each preferred provider that was skipped, why. A provider named explicitly
    (not "auto") that is not available is an error, so a Jetson misconfiguration is loud.
    """
    reasons: list[str] = []
    if not requested or tuple(requested) == ("auto",):
        chosen = [p for p in AUTO_ORDER if p in available]
        for p in AUTO_ORDER:
            if p not in available:
                reasons.append(f"{p} skipped: not in this onnxruntime build")
        if CPU_EP not in chosen:
            chosen.append(CPU_EP)
        return chosen, reasons
    chosen = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            have = ", ".join(available) or "none"
            raise BackendUnavailableError(
                f"execution provider {name!r} is not available in this onnxruntime "
                f"(available: {have})"
            )
        if full not in chosen:
            chosen.append(full)
    if CPU_EP not in chosen:
        chosen.append(CPU_EP)
    return chosen, reasons


def provider_options(provider: str, options: BackendOptions) -> dict[str, str]:
    """Per-provider settings: engine cache for TensorRT, bounded arena for CUDA."""
    if provider == TRT_EP:
        out = {"trt_timing_cache_enable": "True"}
        if options.engine_cache_dir is not None:
            out["trt_engine_cache_enable"] = "True"
            out["trt_engine_cache_path"] = str(options.engine_cache_dir)
            out["trt_timing_cache_path"] = str(options.engine_cache_dir)
        if options.precision == "fp16":
            out["trt_fp16_enable"] = "True"
        if options.precision == "int8":
            out["trt_int8_enable"] = "True"
        return out
    if provider == CUDA_EP:
        out = {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"}
        if options.gpu_mem_limit_bytes > 0:
            out["gpu_mem_limit"] = str(options.gpu_mem_limit_bytes)
        return out
    return {}


def session_options(ort: Any, options: BackendOptions) -> Any:
    """Threads set, spinning off (a capped agent must not burn idle cores), graph opts on."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, options.intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # The CPU arena grows by what is asked for, not by doubling, so a long-running agent's
    # memory tracks the model instead of its high-water mark rounded up.
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.log_severity_level = 3
    return so


_ENV_ARENA_REGISTERED = False


def _register_bounded_cpu_arena(ort: Any) -> None:
    global _ENV_ARENA_REGISTERED
    if _ENV_ARENA_REGISTERED:
        return
    try:
        mem_info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # max_mem=0 (no hard cap), extend strategy 1 = kSameAsRequested, defaults otherwise.
        arena = ort.OrtArenaCfg(0, 1, -1, -1)
        ort.create_and_register_allocator(mem_info, arena)
    except Exception as exc:  # an older ORT without env allocators: default arena is fine
        log.debug("bounded CPU arena not registered: %s", exc)
    _ENV_ARENA_REGISTERED = True


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type, arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


def refuse_external_data(path: Path) -> None:
    """Refuse an ONNX file that points at external data (it could read any file)."""
    from agent.runtime.onnx_wire import external_data_tensor

    found = external_data_tensor(path)
    if found is not None:
        raise ModelError(f"{path}: ONNX model uses external data ({found}), which is refused")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class OnnxBackend(Backend):
    """A model run by ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: Path, options: BackendOptions | None = None):
        options = options or BackendOptions()
        check_model_file(path)
        ort = _import_ort()
        chosen, reasons = choose_providers(options.providers, ort.get_available_providers())
        _register_bounded_cpu_arena(ort)
        so = session_options(ort, options)
        provs = [(p, provider_options(p, options)) for p in chosen]
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=provs)
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
        used = session.get_providers()
        for p in chosen:
            if p not in used:
                reasons.append(f"{p} skipped: failed to initialise (see onnxruntime log)")
        log.info(
            "onnx: %s runs on %s%s",
            path.name,
            used[0],
            ("; " + "; ".join(reasons)) if reasons else "",
        )
        self._session = session
        self._ort_version = ort.__version__
        self.providers: list[str] = list(used)
        self.skipped: list[str] = reasons
        self._threads = options.intra_op_threads
        inputs = [_spec(a) for a in session.get_inputs()]
        outputs = [_spec(a) for a in session.get_outputs()]
        super().__init__(path, inputs, outputs)
        self._input_name = inputs[0].name
        self._input_dtype = np.dtype(inputs[0].dtype) if inputs[0].dtype != "bool" else None
        self._output_names = [o.name for o in outputs]

    def run(self, x: AnyArray) -> list[AnyArray]:
        if self._input_dtype is not None and x.dtype != self._input_dtype:
            x = x.astype(self._input_dtype)
        try:
            out: list[AnyArray] = self._session.run(self._output_names, {self._input_name: x})
        except Exception as exc:
            raise RuntimeFaultError(f"{self.path}: inference failed ({_first_line(exc)})") from None
        return out

    def run_feed(self, feed: Mapping[str, AnyArray]) -> list[AnyArray]:
        names = {s.name for s in self.inputs}
        if set(feed) != names:
            raise InputDataError(f"{self.path}: expected exactly the inputs {sorted(names)}")
        try:
            out: list[AnyArray] = self._session.run(self._output_names, dict(feed))
        except Exception as exc:
            raise RuntimeFaultError(f"{self.path}: inference failed ({_first_line(exc)})") from None
        return out

    @property
    def session(self) -> Any:
        """The underlying onnxruntime.InferenceSession (benchmarks compare against it)."""
        return self._session

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "runtime": f"onnxruntime {self._ort_version}",
            "model": str(self.path),
            "provider": self.providers[0] if self.providers else None,
            "providers": self.providers,
            "skipped": self.skipped,
            "intra_op_threads": self._threads,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }
