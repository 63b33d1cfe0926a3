"""Inference runtimes behind one Backend interface, and the choice of which one to use."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

from agent.errors import BackendUnavailableError, ModelError
from agent.runtime.base import Backend, BackendOptions, Quantization, TensorSpec, check_model_file

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendOptions",
    "Quantization",
    "TensorSpec",
    "installed_runtimes",
    "load_backend",
    "select_backend",
]

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "onnx", "litert", "tensorrt")

_MODULE_FOR = {
    "onnx": ("onnxruntime",),
    "litert": ("ai_edge_litert", "tflite_runtime", "tensorflow"),
    "tensorrt": ("tensorrt",),
}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installed_runtimes(has_module: Callable[[str], bool] = _has_module) -> set[str]:
    """Which backends have their runtime package installed here."""
    return {b for b, mods in _MODULE_FOR.items() if any(has_module(m) for m in mods)}


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    if suffix in (".engine", ".plan", ".trt"):
        return "engine"
    # Sniff: a TFLite flatbuffer has "TFL3" at byte 4; ONNX is a protobuf (no magic).
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return "unknown"
    if head[4:8] == b"TFL3":
        return "tflite"
    return "unknown"


def select_backend(
    path: Path, requested: str = "auto", installed: set[str] | None = None
) -> tuple[str, str]:
    """Pick a backend for a model file. Returns (backend name, reason for the log)."""
    if requested not in BACKEND_NAMES:
        raise BackendUnavailableError(
            f"unknown backend {requested!r} (choose from {', '.join(BACKEND_NAMES)})"
        )
    have = installed_runtimes() if installed is None else installed
    kind = _kind_of(path)
    fits = {"onnx": {"onnx", "tensorrt"}, "tflite": {"litert"}, "engine": {"tensorrt"}}
    if requested != "auto":
        if kind in fits and requested not in fits[kind]:
            raise ModelError(f"{path}: a {kind} model cannot run on the {requested} backend")
        if requested not in have:
            raise BackendUnavailableError(
                f"backend {requested!r} is not installed here (installed: "
                f"{', '.join(sorted(have)) or 'none'})"
            )
        return requested, "asked for"
    if kind == "tflite":
        if "litert" in have:
            return "litert", "a .tflite model"
        raise BackendUnavailableError(
            f"{path}: a TFLite model needs the 'litert' extra (pip install 'edge-agent[litert]')"
        )
    if kind == "engine":
        if "tensorrt" in have:
            return "tensorrt", "a serialized TensorRT engine"
        raise BackendUnavailableError(f"{path}: a TensorRT engine needs TensorRT installed")
    if kind == "onnx":
        # ORT picks its own TensorRT/CUDA EPs when its build has them, so it comes first;
        # native TensorRT is for Jetsons whose onnxruntime lacks the GPU providers.
        if "onnx" in have:
            return "onnx", "an .onnx model"
        if "tensorrt" in have:
            return "tensorrt", "an .onnx model, onnxruntime missing"
        raise BackendUnavailableError(f"{path}: no runtime for ONNX models is installed")
    raise ModelError(f"{path}: unknown model type (expected .onnx, .tflite or .engine)")


def load_backend(
    path: Path | str, backend: str = "auto", options: BackendOptions | None = None
) -> Backend:
    """Load a model file with the requested (or best available) backend."""
    path = Path(path)
    # Before select_backend sniffs the file and ONNX's external-data check reads it.
    check_model_file(path)
    name, reason = select_backend(path, backend)
    log.debug("backend %s chosen for %s (%s)", name, path, reason)
    if name == "onnx":
        from agent.runtime.onnx import OnnxBackend, refuse_external_data

        refuse_external_data(path)
        return OnnxBackend(path, options)
    if name == "litert":
        from agent.runtime.litert import LiteRTBackend

        return LiteRTBackend(path, options)
    from agent.runtime.tensorrt import TensorRTBackend

    return TensorRTBackend(path, options)
