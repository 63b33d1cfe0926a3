"""LiteRT / TFLite backend: ai_edge_litert first, then tflite_runtime, then tensorflow.lite."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendUnavailableError, ModelError, RuntimeFaultError
from agent.runtime.base import (
    AnyArray,
    Backend,
    BackendOptions,
    Quantization,
    TensorSpec,
    check_model_file,
)

log = logging.getLogger(__name__)

# (module, attribute holding the Interpreter class), in order of preference.
INTERPRETER_MODULES = (
    ("ai_edge_litert.interpreter", "Interpreter"),
    ("tflite_runtime.interpreter", "Interpreter"),
    ("tensorflow.lite", "Interpreter"),
)


def find_interpreter(modules: tuple[tuple[str, str], ...] = INTERPRETER_MODULES) -> tuple[Any, str]:
    """Return (Interpreter class, module name) for the first importable runtime."""
    errors: list[str] = []
    for module_name, attr in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or tflite_runtime's numpy-2 ABI failure
            errors.append(f"{module_name}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            continue
        return getattr(module, attr), module_name
    raise BackendUnavailableError(
        f"no TFLite interpreter: install the 'litert' extra (ai-edge-litert) [{'; '.join(errors)}]"
    )


def _quant(detail: dict[str, Any]) -> Quantization | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return Quantization(scale=float(scale), zero_point=int(zero_point))


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape_src = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if int(d) >= 0 else None for d in shape_src)
    return TensorSpec(
        name=str(detail["name"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=shape,
        quantization=_quant(detail),
    )


class LiteRTBackend(Backend):
    """A .tflite model run by the LiteRT interpreter."""

    name = "litert"

    def __init__(self, path: Path, options: BackendOptions | None = None):
        options = options or BackendOptions()
        check_model_file(path)
        interpreter_cls, module_name = find_interpreter()
        try:
            interp = interpreter_cls(
                model_path=str(path), num_threads=max(1, options.intra_op_threads)
            )
            interp.allocate_tensors()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
            raise ModelError(f"{path}: {module_name} cannot load it ({first})") from None
        self._interp = interp
        self._module = module_name
        self._threads = options.intra_op_threads
        in_details = interp.get_input_details()
        out_details = interp.get_output_details()
        super().__init__(path, [_spec(d) for d in in_details], [_spec(d) for d in out_details])
        self._in_index = int(in_details[0]["index"])
        self._in_dtype = np.dtype(in_details[0]["dtype"])
        self._in_quant = _quant(in_details[0])
        self._out = [(int(d["index"]), _quant(d)) for d in out_details]
        self._batch = int(in_details[0]["shape"][0]) if len(in_details[0]["shape"]) else 1
        self._can_resize = True
        log.info("litert: %s runs on %s (%d threads)", path.name, module_name, self._threads)

    def max_batch(self) -> int | None:
        # run() resizes the batch dimension, or falls back to row by row.
        return None

    def _resize(self, batch: int) -> bool:
        if not self._can_resize:
            return False
        shape = list(self._interp.get_input_details()[0]["shape"])
        shape[0] = batch
        try:
            self._interp.resize_tensor_input(self._in_index, shape, strict=False)
            self._interp.allocate_tensors()
        except Exception as exc:
            log.info("litert: %s cannot resize its batch (%s); running row by row", self.path, exc)
            self._can_resize = False
            shape[0] = self._batch
            self._interp.resize_tensor_input(self._in_index, shape, strict=False)
            self._interp.allocate_tensors()
            return False
        self._batch = batch
        return True

    def _invoke(self, x: AnyArray) -> list[AnyArray]:
        if self._in_quant is not None and self._in_dtype.kind in "iu":
            x = self._in_quant.quantize(x, self._in_dtype)
        elif x.dtype != self._in_dtype:
            x = x.astype(self._in_dtype)
        try:
            self._interp.set_tensor(self._in_index, x)
            self._interp.invoke()
        except Exception as exc:
            raise RuntimeFaultError(f"{self.path}: inference failed ({exc})") from None
        outs: list[AnyArray] = []
        for index, quant in self._out:
            y = self._interp.get_tensor(index)
            if quant is not None and y.dtype.kind in "iu":
                outs.append(quant.dequantize(y))
            else:
                outs.append(np.array(y, dtype=np.float32, copy=True))
        return outs

    def run(self, x: AnyArray) -> list[AnyArray]:
        n = int(x.shape[0])
        if n == self._batch or self._resize(n):
            return self._invoke(x)
        # Fixed-batch model: one row (or batch-sized slice) at a time.
        rows = []
        for i in range(0, n, self._batch):
            part = x[i : i + self._batch]
            if len(part) < self._batch:
                pad = np.zeros((self._batch - len(part), *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            rows.append(self._invoke(part))
        return [np.concatenate([r[k] for r in rows])[:n] for k in range(len(self._out))]

    def close(self) -> None:
        self._interp = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "runtime": self._module,
            "model": str(self.path),
            "provider": "cpu",
            "intra_op_threads": self._threads,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }
