"""Raw-frame golden sets: run each model's own preprocess -> model -> postprocess, as the daemon."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import PreprocessConfig
from agent.errors import EdgeAgentError, InputDataError
from agent.ota.gate_data import PREPROCESS_NAME, GateModel, GoldenSet
from agent.runtime.base import Backend

# The gate's check of the pipeline: its value is the number of golden frames that failed
# (0 to pass), so the table reads like every other check.
PIPELINE_CHECK = "pipeline"


class PipelineRefused(Exception):
    """The candidate's preprocessing, model and postprocessing do not work on the golden
    frames; ``failed_rows`` of them failed, the first with ``reason``. Raised only inside
    the gate and turned into a failed ``pipeline`` check (the candidate is refused)."""

    def __init__(self, reason: str, failed_rows: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failed_rows = failed_rows


@dataclass(frozen=True)
class ModelPipeline:
    """How one model turns a golden frame into its result: the daemon's settings for it."""

    preprocess: PreprocessConfig
    labels: tuple[str, ...]
    where: str

    def cache_key(self, golden_sha256: str) -> str:
        """The golden part of the baseline cache key: the same frames preprocessed another
        way are other inputs, so the preprocessing is part of the key."""
        text = json.dumps(asdict(self.preprocess), sort_keys=True, default=list)
        return hashlib.sha256(f"{golden_sha256}\0{text}".encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        pre = self.preprocess
        return {
            "from": self.where,
            "task": pre.task,
            "resize": list(pre.resize),
            "layout": pre.layout,
            "color_order": pre.color_order,
            "scale": pre.scale,
        }


def model_pipeline(model: GateModel, golden: GoldenSet) -> ModelPipeline:
    """The package's own preprocess block, task and labels (agent.pipeline.model, the seam
    the daemon loads packages through); a bare model file takes the golden set's
    preprocess.yaml, else the defaults. A manifest whose block cannot be read raises."""
    from agent.pipeline.model import package_model_parts
    from agent.pipeline.preprocess import preprocess_from_manifest

    if model.manifest is not None and model.package_dir is not None:
        pre, labels = package_model_parts(model.package_dir, model.manifest)
        return ModelPipeline(pre, labels, f"{model.label} manifest")
    where = str(golden.path / PREPROCESS_NAME)
    pre = preprocess_from_manifest(golden.preprocess, where)
    return ModelPipeline(pre, (), where if golden.preprocess is not None else "defaults")


def preprocess_frames(
    backend: Backend, pipeline: ModelPipeline, golden: GoldenSet
) -> npt.NDArray[np.float32]:
    """Every golden frame through the daemon's Preprocessor for ``backend``'s first input:
    the model's inputs ``[N, ...]``. PipelineRefused names the first frame that failed and
    how many did (a schema no frame can meet fails them all)."""
    from agent.pipeline.preprocess import Preprocessor
    from agent.pipeline.sources import Frame

    assert golden.frames is not None
    rows = len(golden.frames)
    try:
        to_batch = Preprocessor(pipeline.preprocess, backend.inputs[0]).batch
    except InputDataError as exc:
        raise PipelineRefused(f"{pipeline.where}: {exc}", rows) from None
    out: list[npt.NDArray[np.float32]] = []
    failed = 0
    first = ""
    for i, data in enumerate(golden.frames):
        frame = Frame(seq=i + 1, data=data, source=f"golden frame {i}", label=None)
        try:
            out.append(to_batch([frame])[0])
        except InputDataError as exc:
            failed += 1
            first = first or str(exc)
    if failed:
        raise PipelineRefused(first, failed)
    inputs: npt.NDArray[np.float32] = np.stack(out).astype(np.float32, copy=False)
    try:
        backend.check_input(inputs)
    except InputDataError as exc:
        raise PipelineRefused(str(exc), rows) from None
    return inputs


def check_outputs(
    outputs: npt.NDArray[np.float32],
    pipeline: ModelPipeline,
    golden: GoldenSet,
    backend: Backend,
) -> None:
    """The candidate's outputs on the golden frames: finite, and read by the daemon's
    postprocessing for the package's declared task; PipelineRefused says what is wrong."""
    from agent.pipeline.detection import input_image_size, row_result
    from agent.pipeline.postprocess import top_k_rows

    rows = len(outputs)
    flat = outputs.reshape(rows, -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise PipelineRefused(
            f"the model outputs NaN or infinite values (first: frame {int(np.argmax(bad))})",
            int(bad.sum()),
        )
    pre = pipeline.preprocess
    if pre.task != golden.task:
        # What the daemon would make of this output for the declared task, then refuse:
        # a classifier's [N, classes] read as boxes (or boxes as classes) is no result.
        how = "classes"
        if pre.task != "classification":
            try:
                size = input_image_size(backend.inputs[0].shape, pre.layout)
                row_result([outputs[:1]], pre, pipeline.labels, 0, size)
                how = "results"
            except (EdgeAgentError, ValueError, IndexError, TypeError) as exc:
                how = f"nothing ({exc})"
        raise PipelineRefused(
            f"{pipeline.where}: declared task {pre.task}, but the golden set is "
            f"{golden.task} (output {list(outputs.shape[1:])} read as {how})",
            rows,
        )
    if outputs.ndim != 2:
        raise PipelineRefused(
            f"a classifier's output must be [N, classes], got {list(outputs.shape)}", rows
        )
    classes = int(outputs.shape[1])
    if pipeline.labels and len(pipeline.labels) != classes:
        raise PipelineRefused(
            f"{pipeline.where}: the output has {classes} classes, the manifest names "
            f"{len(pipeline.labels)} labels",
            rows,
        )
    # the daemon's own top-k on every row: what the sinks and telemetry would get
    try:
        top_k_rows(outputs, pre.top_k, pipeline.labels)
    except (ValueError, IndexError) as exc:
        raise PipelineRefused(f"postprocessing failed: {exc}", rows) from None


def histogram_figures(outputs: npt.NDArray[np.float32]) -> Mapping[str, Any] | None:
    """The class and confidence histograms of a classifier's golden outputs, binned as the
    daemon's telemetry summary bins live results (drift baseline); None for other tasks."""
    from agent.telemetry.drift import golden_baseline

    if outputs.ndim != 2 or outputs.shape[1] < 1 or not np.isfinite(outputs).all():
        return None
    return golden_baseline(outputs).to_dict()


def pipeline_detail(cand: ModelPipeline, rows: int) -> str:
    pre = cand.preprocess
    size = "x".join(str(v) for v in pre.resize) or "model size"
    where = cand.where.rsplit("/", 1)[-1]
    return (
        f"{rows} frames: preprocess {size} {pre.color_order} {pre.layout} ({where}) "
        f"-> model -> {pre.task}: all fit"
    )
