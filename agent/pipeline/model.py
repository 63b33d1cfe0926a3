"""The model seam: a model file or package dir (+ manifest, + config.model) -> a runnable model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig, PreprocessConfig, SourceConfig
from agent.errors import EdgeAgentError, InputDataError, ModelError
from agent.ota.killpoint import kill_point
from agent.pipeline.preprocess import Preprocessor, preprocess_from_manifest
from agent.pipeline.slot import ActiveModel
from agent.pipeline.sources import Frame, open_source, synthetic_shape
from agent.runtime import BackendOptions, load_backend
from agent.runtime.base import Backend

# The daemon, the OTA service (install, hot swap, rollback, probation), the gate's child
# process and the CLI all load models through this module, so a model runs the same way
# (backend options, schema, pre/postprocessing) wherever it is loaded.

MAX_MANIFEST_BYTES = 1 << 20
RUNTIME_FOR_KIND = {"onnx": "auto", "tflite": "litert", "tensorrt": "tensorrt"}
# the configured backends that can run a package of each runtime.kind
PACKAGE_BACKENDS = {"onnx": ("onnx", "tensorrt"), "tflite": ("litert",), "tensorrt": ("tensorrt",)}
# how long the probe waits for a frame from a freshly opened source (a directory scan)
PROBE_READ_TIMEOUT_S = 1.0


def read_manifest(package_dir: Path) -> dict[str, Any]:
    """The manifest of an installed package directory, as plain data."""
    path = package_dir / "manifest.json"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelError(f"{path}: manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: installed package has no manifest.json") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: manifest is not a JSON object")
    return data


def backend_options(config: AgentConfig, precision: str = "fp32") -> BackendOptions:
    """The backend options every model load in this agent uses, from ``config.model``.

    The daemon's start, a reload, an OTA install, hot swap, rollback, probation and the
    gate's candidate all load through here, so a Jetson's TensorRT provider and engine
    cache apply to every model, not only the one configured at start.
    """
    m = config.model
    return BackendOptions(
        intra_op_threads=m.intra_op_threads,
        providers=m.providers,
        engine_cache_dir=m.engine_cache_dir,
        precision=precision,
    )


def load_model_file(
    config: AgentConfig, path: Path, backend: str = "auto", precision: str = "fp32"
) -> Backend:
    """Load one model file with ``config.model``'s backend options (not warmed)."""
    return load_backend(path, backend, backend_options(config, precision))


def package_backend_name(kind: str, configured: str, where: str) -> str:
    """The backend for a package of ``runtime.kind``: config.model.backend when it can run
    that kind (a Jetson configured for native TensorRT keeps it for OTA packages), else the
    kind's own runtime."""
    fits = PACKAGE_BACKENDS.get(kind)
    if fits is None:
        raise ModelError(f"{where}: unknown runtime.kind {kind!r}")
    return configured if configured in fits else RUNTIME_FOR_KIND[kind]


def package_model_file(package_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """The model file an installed package's manifest names, refused when outside it."""
    where = str(package_dir / "manifest.json")
    runtime = manifest.get("runtime") or {}
    model = runtime.get("model") if isinstance(runtime, Mapping) else None
    if not isinstance(model, str):
        raise ModelError(f"{where}: runtime.model is missing")
    model_path = (package_dir / model).resolve()
    if package_dir.resolve() not in model_path.parents:
        raise ModelError(f"{where}: runtime.model points outside the package")
    return model_path


def load_package_backend(
    config: AgentConfig, package_dir: Path, manifest: Mapping[str, Any]
) -> Backend:
    """Load (not warm) the model of an installed or extracted package with the runtime its
    manifest names and ``config.model``'s backend options: the one way packages load."""
    model_path = package_model_file(package_dir, manifest)
    runtime = manifest.get("runtime") or {}
    where = str(package_dir / "manifest.json")
    backend = package_backend_name(str(runtime.get("kind", "onnx")), config.model.backend, where)
    # Named per package so a test can make one model "crash the runtime on load" on every
    # start (EDGE_AGENT_KILL_AT=model.load:digits-1.1.0) while other models load fine.
    kill_point(f"model.load:{manifest.get('name', '')}-{manifest.get('version', '')}")
    return load_model_file(config, model_path, backend, str(runtime.get("precision", "fp32")))


def load_source_backend(config: AgentConfig, source: Path) -> Backend:
    """A package dir (its manifest's runtime) or a model file (config.model.backend), loaded
    as the daemon would run it: what the gate compares."""
    if source.is_dir():
        return load_package_backend(config, source, read_manifest(source))
    return load_model_file(config, source, config.model.backend)


def package_model_parts(
    package_dir: Path, manifest: Mapping[str, Any]
) -> tuple[PreprocessConfig, tuple[str, ...]]:
    """The preprocessing (with task) and labels an installed package's manifest describes."""
    where = str(package_dir / "manifest.json")
    pre_data = dict(manifest.get("preprocess") or {})
    if manifest.get("task") in ("classification", "detection", "segmentation"):
        pre_data["task"] = manifest["task"]
    detection = manifest.get("detection")
    if isinstance(detection, Mapping):
        # the output layout and post-processing the package names (docs/packages.md)
        pre_data["detection_layout"] = detection.get("layout", "yolo")
        for key in ("score_threshold", "iou_threshold", "max_detections", "box_units"):
            if key in detection:
                pre_data[key] = detection[key]
    pre = preprocess_from_manifest(pre_data, where)
    labels = manifest.get("labels") or ()
    if isinstance(labels, str):
        labels = (package_dir / labels).read_text(encoding="utf-8").splitlines()
    return pre, tuple(str(x) for x in labels)


def package_model(backend: Backend, package_dir: Path, manifest: Mapping[str, Any]) -> ActiveModel:
    """An ActiveModel for an already loaded (and warm) ``backend`` of a package: the task,
    thresholds, preprocessing and labels come from its manifest."""
    pre, labels = package_model_parts(package_dir, manifest)
    return ActiveModel(
        backend=backend,
        name=str(manifest.get("name", package_dir.name)),
        version=str(manifest.get("version", "0.0.0")),
        preprocess=pre,
        labels=labels,
        manifest=manifest,
    )


def load_package(
    config: AgentConfig, package_dir: Path, manifest: Mapping[str, Any] | None = None
) -> ActiveModel:
    """Load and warm the model of a package directory (not yet active)."""
    data = read_manifest(package_dir) if manifest is None else manifest
    # parse the schema before the (slow) model load, so a bad manifest fails fast
    package_model_parts(package_dir, data)
    backend = load_package_backend(config, package_dir, data)
    try:
        backend.warmup(config.model.warmup_runs)
        return package_model(backend, package_dir, data)
    except BaseException:
        backend.close()
        raise


def configured_model(config: AgentConfig) -> ActiveModel:
    """Load and warm the model named by config.model.path (no package installed)."""
    from agent.errors import ConfigError

    path = config.model.path
    if path is None:
        raise ConfigError(
            f"model.path: no model configured and no installed package at "
            f"{config.state_dir / 'current'}"
        )
    backend = load_model_file(config, path, config.model.backend)
    try:
        backend.warmup(config.model.warmup_runs)
    except BaseException:
        backend.close()
        raise
    return ActiveModel(
        backend=backend,
        name=path.stem,
        version="local",
        preprocess=config.preprocess,
        labels=config.model.labels,
    )


# ---------------------------------------------------------------------- the probe frame


def probe_frame(source: SourceConfig, model: ActiveModel, recent: Frame | None = None) -> Frame:
    """A frame like the configured source delivers, for ``probe``.

    ``recent`` (the last frame the running loop read from this same source) is the best
    witness. Otherwise a synthetic or directory source is opened afresh and read once (it
    shares nothing with a running one); a camera or video is never opened a second time
    (the daemon holds it), so its stand-in is a blank frame of the model's own size.
    """
    if recent is not None:
        return recent
    spec = model.backend.inputs[0]
    layout = model.preprocess.layout
    if source.kind in ("synthetic", "directory"):
        opened = open_source(source, spec.shape, layout)
        try:
            frame = opened.read(PROBE_READ_TIMEOUT_S)
        finally:
            opened.close()
        if frame is not None:
            return frame
    blank = SourceConfig(kind="synthetic", pattern="random")
    shape = synthetic_shape(blank, spec.shape, layout)
    return Frame(seq=0, data=np.zeros(shape, dtype=np.uint8), source=f"probe:{source.kind}")


def probe(model: ActiveModel, frame: Frame) -> None:
    """Run one frame through ``model``'s preprocessing and the model itself.

    Raises InputDataError naming what does not fit (a mean/std for another channel count,
    a frame that resizes to the wrong shape) or the runtime's error, so a reload or an
    install that could not process a single frame is refused before it goes live.
    """
    where = f"{model.name} {model.version}"
    try:
        batch = Preprocessor(model.preprocess, model.backend.inputs[0]).batch([frame])
        model.backend.run(batch)
    except EdgeAgentError as exc:
        raise InputDataError(f"{where}: probe frame from {frame.source} failed: {exc}") from None
