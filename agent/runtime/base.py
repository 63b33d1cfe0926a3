"""The one Backend interface every inference runtime implements, and the tensor specs it reports."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import InputDataError, ModelError
from agent.textio import check_regular_file, open_regular

FloatArray = npt.NDArray[np.float32]
AnyArray = npt.NDArray[Any]

# How many rows a dynamic-batch model gets per call in predict(); keeps memory flat.
DEFAULT_CHUNK_ROWS = 256


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int

    def quantize(self, x: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, dtype=np.float32) / self.scale) + self.zero_point
        out: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(dtype)
        return out

    def dequantize(self, q: npt.NDArray[Any]) -> FloatArray:
        real = (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        out: FloatArray = real.astype(np.float32)
        return out


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type, shape (None for a dynamic dimension) and quantization of a tensor."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    quantization: Quantization | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = {
                "scale": self.quantization.scale,
                "zero_point": self.quantization.zero_point,
            }
        return out

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model insists on, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape else None


@dataclass(frozen=True)
class BackendOptions:
    """Knobs shared by all backends; defaults suit a small ARM board."""

    intra_op_threads: int = 1
    # ORT providers in order of preference; ("auto",) means TensorRT -> CUDA -> CPU.
    providers: tuple[str, ...] = ("auto",)
    engine_cache_dir: Path | None = None
    precision: str = "fp32"
    gpu_mem_limit_bytes: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Stream a file through sha256 (models can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open_regular(path, "model file", ModelError) as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_file(path: Path) -> None:
    """Refuse a path that is missing, empty or not a regular file, with a one-line reason.

    Runtimes open the model by name, so this runs before any of them (or our own sniffing)
    touches it: a FIFO would block the open forever and a device could be acted on.
    """
    if check_regular_file(path, "model file", ModelError).st_size == 0:
        raise ModelError(f"{path}: model file is empty")


class Backend(abc.ABC):
    """A loaded model ready to run. Subclasses wrap one runtime each."""

    #: short runtime name: "onnx", "litert", "tensorrt"
    name: str = "backend"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.path = path
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        if not self.inputs or not self.outputs:
            raise ModelError(f"{path}: model declares no inputs or no outputs")

    # ---- the interface ----

    @abc.abstractmethod
    def run(self, x: AnyArray) -> list[AnyArray]:
        """Run one batch through a single-input model; returns every output as float32.

        ``x`` is in the model's float domain; quantized inputs are quantized here and
        quantized outputs dequantized, so callers never see the integer representation.
        """

    def run_feed(self, feed: Mapping[str, AnyArray]) -> list[AnyArray]:
        """Run a model with several named inputs. Single-input backends accept one name."""
        if len(feed) != 1 or self.inputs[0].name not in feed:
            names = ", ".join(s.name for s in self.inputs)
            raise InputDataError(f"{self.path}: expected exactly the inputs [{names}]")
        return self.run(feed[self.inputs[0].name])

    def warmup(self, runs: int = 3) -> None:
        """Run a few zero batches so first-call costs (allocation, kernels) are paid now."""
        x = self.zeros(batch=1)
        for _ in range(runs):
            self.run(x)

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free on GC
        """Release the runtime's resources; the backend must not be used afterwards."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain data about the loaded model and runtime, for logs, status and doctor."""

    # ---- helpers shared by all backends ----

    def zeros(self, batch: int = 1) -> FloatArray:
        """A zero input batch of the right shape, float32 (dynamic dims other than batch -> 1)."""
        spec = self.inputs[0]
        dims = [d if d is not None else 1 for d in spec.shape[1:]]
        return np.zeros([batch, *dims], dtype=np.float32)

    def check_input(self, x: AnyArray) -> None:
        """Raise InputDataError when ``x`` cannot feed the first input (rank or fixed dims)."""
        spec = self.inputs[0]
        if x.ndim != len(spec.shape):
            raise InputDataError(
                f"{self.path}: input '{spec.name}' expects rank {len(spec.shape)} "
                f"{_shape_str(spec.shape)}, got shape {tuple(x.shape)}"
            )
        for want, got in zip(spec.shape[1:], x.shape[1:]):
            if want is not None and want != got:
                raise InputDataError(
                    f"{self.path}: input '{spec.name}' expects shape {_shape_str(spec.shape)}, "
                    f"got {tuple(x.shape)}"
                )
        if not np.issubdtype(x.dtype, np.number):
            raise InputDataError(f"{self.path}: input must be numeric, got dtype {x.dtype}")

    def max_batch(self) -> int | None:
        """The most rows one run() accepts; None when any batch size works."""
        return self.inputs[0].fixed_batch

    def predict(self, x: AnyArray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> FloatArray:
        """Run every row of ``x`` and return the first output for all rows, as float32.

        Handles models with a fixed batch of 1 (row by row) and bounds memory by chunking.
        """
        x = np.asarray(x)
        self.check_input(x)
        x = x.astype(np.float32, copy=False)
        fixed = self.max_batch()
        step = fixed if fixed is not None else max(1, chunk_rows)
        if len(x) == 0:
            raise InputDataError(f"{self.path}: input has no rows")
        parts: list[FloatArray] = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if fixed is not None and n < fixed:
                pad = np.zeros((fixed - n, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            out = np.asarray(self.run(chunk)[0], dtype=np.float32)
            parts.append(out[:n])
        return np.concatenate(parts)


def _shape_str(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
