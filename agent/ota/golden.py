"""The golden gate: run current and candidate models on the golden set and judge the candidate."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError, InputDataError, ModelError
from agent.ota.gate_cache import BaselineCache, CachedRun, store_runs
from agent.ota.gate_checks import (
    classification_checks,
    detection_checks,
    detection_gate_checks,
    detection_metrics,
    detection_spec_of,
    judge,
    latency_memory_checks,
    segmentation_checks,
)
from agent.ota.gate_data import (
    GateModel,
    GoldenSet,
    ModelSource,
    as_gate_model,
    load_golden_set,
)
from agent.ota.gate_frames import (
    PIPELINE_CHECK,
    ModelPipeline,
    PipelineRefused,
    check_outputs,
    histogram_figures,
    model_pipeline,
    pipeline_detail,
    preprocess_frames,
)
from agent.ota.gate_measure import (
    LATENCY_CONFIRM_PASSES,
    MB,
    WARMUP_RUNS,
    ConfirmedLatency,
    Measured,
    Prepare,
    Progress,
    backend_identity,
    confirm_latency,
    current_rss_bytes,
    detect_precision,
    interleaved_pass,
    latency_fails,
    latency_summaries_ms,
    load_measured,
    packed_run,
    predicted_identity,
    tensor_inputs,
)
from agent.ota.gate_policy import (
    GatePolicy,
    PolicyChange,
    apply_package_gate,
    load_policy,
    resolve_policy,
)
from agent.ota.gate_report import (
    GateCheck,
    GateReport,
    pipeline_refused_report,
    smallest_margin,
)
from agent.runtime.base import Backend, file_sha256

log = logging.getLogger(__name__)

# run_gate and what the gate's callers used to import from here before the gate was split
# into gate_measure (measuring), gate_checks (judging) and gate_report (the report).
__all__ = [
    "LATENCY_CONFIRM_PASSES",
    "MB",
    "WARMUP_RUNS",
    "GateCheck",
    "GatePolicy",
    "GateReport",
    "PolicyChange",
    "backend_identity",
    "classification_checks",
    "current_rss_bytes",
    "detection_checks",
    "detection_gate_checks",
    "detection_metrics",
    "detection_spec_of",
    "latency_memory_checks",
    "latency_summaries_ms",
    "load_policy",
    "predicted_identity",
    "run_gate",
    "segmentation_checks",
    "smallest_margin",
]

Run = Callable[[npt.NDArray[np.float32]], list[Any]]


@dataclass(frozen=True)
class _Setup:
    """What run_gate resolved before measuring: golden set, policy, models and cache."""

    golden: GoldenSet
    policy: GatePolicy
    changes: list[PolicyChange]
    base_model: GateModel
    cand_model: GateModel
    base_sha: str
    cand_sha: str
    # Raw frames: each model's own preprocessing (None for a tensors golden set)
    pipelines: tuple[ModelPipeline, ModelPipeline] | None
    golden_keys: tuple[str, str]  # the golden set's cache key for each model
    cache: BaselineCache | None
    cached: CachedRun | None
    cache_info: dict[str, Any]
    started: float

    def refused(self, reason: str, failed_rows: int) -> GateReport:
        """The report of a candidate whose pipeline does not work on the golden frames."""
        report = pipeline_refused_report(
            self.golden,
            self.policy,
            self.changes,
            self.base_model,
            self.cand_model,
            reason,
            failed_rows,
            self.started,
        )
        log.info("gate FAILED for %s: %s", self.cand_model.label, report.checks[0].detail)
        return report


@dataclass(frozen=True)
class _Runs:
    """What measuring gave: both models' runs, the confirming latencies and the identities."""

    base: Measured
    cand: Measured
    confirmed: ConfirmedLatency | None
    base_precision: str
    cand_precision: str
    cand_info: dict[str, Any]
    cand_id: str
    base_run_id: str | None  # None: the baseline came from the cache


def run_gate(
    baseline: ModelSource,
    candidate: ModelSource,
    golden_dir: Path | str,
    policy: GatePolicy | Mapping[str, Any] | Path | str | None = None,
    package_gate: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    baseline_cache: Path | str | None = None,
    backend: str = "auto",
) -> GateReport:
    """Run both models on the golden set and check the candidate against the guard rails.

    ``policy`` defaults to ``golden_dir/policy.yaml`` (or the built-in defaults);
    ``package_gate`` defaults to the candidate package's ``gate`` and may only tighten.
    With ``baseline_cache`` (a folder), the baseline's outputs, latencies and RSS come from
    an earlier run of the same model bytes on the same golden set and backend when there is
    one, and both models' runs are stored for next time. ``backend`` picks the runtime for
    model files ("auto": by file type; a package's runtime.kind wins under "auto").
    Bad input raises a UsageError (exit 2); a failed check does not raise:
    ``report.passed`` is False.
    """
    started = time.perf_counter()
    golden_dir = Path(golden_dir)
    golden = load_golden_set(golden_dir)
    device_policy = resolve_policy(policy, golden_dir)
    base_model, base_backend = as_gate_model(baseline, backend)
    cand_model, cand_backend = as_gate_model(candidate, backend)
    if package_gate is None:
        package_gate = cand_model.package_gate
    effective, changes = apply_package_gate(device_policy, package_gate)
    for change in changes:
        if not change.applied:
            log.warning(
                "package gate %s=%r ignored: %s", change.key, change.requested, change.reason
            )
    setup = _set_up(
        golden, effective, changes, (base_model, cand_model), base_backend, baseline_cache, started
    )
    if isinstance(setup, GateReport):
        return setup
    try:
        runs = _measure(setup, base_backend, cand_backend, progress)
    except PipelineRefused as exc:
        return setup.refused(exc.reason, exc.failed_rows)
    metrics, checks = judge(
        golden,
        effective,
        runs.base,
        runs.cand,
        runs.base_precision,
        runs.cand_precision,
        cand_model.labels or base_model.labels,
        (
            detection_spec_of(base_model, golden, runs.base.outputs.shape),
            detection_spec_of(cand_model, golden, runs.cand.outputs.shape),
        )
        if golden.task == "detection"
        else None,
        runs.confirmed,
    )
    report = _report(setup, runs, metrics, checks)
    log.info("gate %s for %s", "passed" if report.passed else "FAILED", cand_model.label)
    return report


def _set_up(
    golden: GoldenSet,
    policy: GatePolicy,
    changes: list[PolicyChange],
    models: tuple[GateModel, GateModel],
    base_backend: Backend | None,
    baseline_cache: Path | str | None,
    started: float,
) -> _Setup | GateReport:
    """Hashes, raw-frame pipelines and the baseline cache lookup; a GateReport instead when
    the candidate's preprocessing cannot even be read (the pipeline check fails)."""
    base_model, cand_model = models
    cache = BaselineCache(Path(baseline_cache)) if baseline_cache is not None else None
    cache_info: dict[str, Any] = {"enabled": cache is not None, "used": False}
    # Resolving a model read its file once for both its precision and its hash.
    base_sha = base_model.sha256 or file_sha256(base_model.model_path)
    cand_sha = cand_model.sha256 or file_sha256(cand_model.model_path)
    setup = _Setup(
        golden=golden,
        policy=policy,
        changes=changes,
        base_model=base_model,
        cand_model=cand_model,
        base_sha=base_sha,
        cand_sha=cand_sha,
        pipelines=None,
        golden_keys=(golden.sha256, golden.sha256),
        cache=cache,
        cached=None,
        cache_info=cache_info,
        started=started,
    )
    # Raw frames: each model's own preprocessing makes its inputs, and the same frames
    # preprocessed another way are other inputs (part of the cache key).
    if golden.form == "frames":
        try:
            base_pipe = model_pipeline(base_model, golden)
        except ConfigError as exc:
            raise InputDataError(f"the current model's preprocessing: {exc}") from None
        try:
            cand_pipe = model_pipeline(cand_model, golden)
        except ConfigError as exc:
            return setup.refused(str(exc), golden.rows)
        setup = dataclasses.replace(
            setup,
            pipelines=(base_pipe, cand_pipe),
            golden_keys=(base_pipe.cache_key(golden.sha256), cand_pipe.cache_key(golden.sha256)),
        )
    if cache is not None:
        base_id = backend_identity(base_backend) if base_backend else predicted_identity(base_model)
        if base_id is not None:
            cached = cache.load(base_sha, setup.golden_keys[0], base_id, golden.rows)
            setup = dataclasses.replace(setup, cached=cached)
        cache_info.update(
            {"path": str(cache.root), "backend": base_id, "used": setup.cached is not None}
        )
    return setup


def _inputs_of(setup: _Setup, role: int) -> Prepare:
    """How a loaded model (0: baseline, 1: candidate) gets its golden inputs: inputs.npy as
    it is, or the raw frames through that model's own preprocessing."""
    golden, pipelines = setup.golden, setup.pipelines
    if pipelines is None:
        return tensor_inputs(golden)
    pipe = pipelines[role]

    def frames_to_inputs(backend: Backend) -> npt.NDArray[np.float32]:
        try:
            return preprocess_frames(backend, pipe, golden)
        except PipelineRefused as exc:
            if role == 1:
                raise
            raise InputDataError(
                f"the golden frames do not fit the current model's preprocessing: {exc}"
            ) from None

    return frames_to_inputs


def _measure(
    setup: _Setup,
    base_backend: Backend | None,
    cand_backend: Backend | None,
    progress: Progress | None,
) -> _Runs:
    """Load what must run (baseline first), time one interleaved pass, and time the rows
    that can move a p95 again when that pass fails on latency; what it loaded, it closes.
    A candidate whose outputs do not fit the golden frames raises PipelineRefused."""
    golden, cached = setup.golden, setup.cached
    owned: list[Backend] = []

    def ready(
        role: int, backend: Backend | None, model: GateModel
    ) -> tuple[Backend, int, npt.NDArray[np.float32]]:
        """``model`` loaded (unless given), with the RSS its loading added and its inputs."""
        if backend is None:
            backend, rss, x = load_measured(model, _inputs_of(setup, role))
            owned.append(backend)
            return backend, rss, x
        return backend, 0, _inputs_of(setup, role)(backend)

    def run_of(b: Backend) -> Run:
        return packed_run(b) if golden.task == "detection" and len(b.outputs) > 1 else b.run

    to_run: list[Backend] = []
    inputs: list[npt.NDArray[np.float32]] = []
    base_rss = 0
    try:
        if cached is None:
            base_backend, base_rss, base_x = ready(0, base_backend, setup.base_model)
            to_run.append(base_backend)
            inputs.append(base_x)
        cand_backend, cand_rss, cand_x = ready(1, cand_backend, setup.cand_model)
        to_run.append(cand_backend)
        inputs.append(cand_x)
        runs = [run_of(b) for b in to_run]
        outs, lats, pass_growth = interleaved_pass(to_run, inputs, progress, runs)
        first_lats = (cached.latencies_s if cached is not None else lats[0], lats[-1])
        confirmed: ConfirmedLatency | None = None
        if latency_fails(setup.policy, *first_lats):
            if cached is None:
                pair_x = (inputs[0], cand_x)
            else:
                # the cached latencies are from another minute: time both side by side now
                base_backend, _, base_x = ready(0, base_backend, setup.base_model)
                runs.insert(0, run_of(base_backend))
                pair_x = (base_x, cand_x)
            confirmed = confirm_latency(
                runs[0], runs[-1], pair_x, first_lats if cached is None else None
            )
        cand_info = cand_backend.describe()
        cand_id = backend_identity(cand_backend)
        base_run_id = backend_identity(to_run[0]) if cached is None else None
        if setup.pipelines is not None:
            check_outputs(outs[-1], setup.pipelines[1], golden, cand_backend)
    finally:
        for loaded in owned:
            loaded.close()
    cand = Measured(outs[-1], lats[-1], cand_rss + max(0, pass_growth))
    if cached is not None:
        base = Measured(cached.outputs, cached.latencies_s, cached.rss_added_bytes, True)
        base_precision = str(cached.meta.get("precision", setup.base_model.precision))
    else:
        base = Measured(outs[0], lats[0], base_rss)
        base_precision = detect_precision(setup.base_model, base_backend)
    # A detector may change its layout (YOLO -> SSD): boxes are compared, not raw outputs.
    if golden.task != "detection" and base.outputs.shape[1:] != cand.outputs.shape[1:]:
        raise ModelError(
            f"{setup.cand_model.model_path}: output shape {list(cand.outputs.shape[1:])} "
            f"differs from the current model's {list(base.outputs.shape[1:])} "
            "(different output size)"
        )
    cand_precision = detect_precision(setup.cand_model, cand_backend)
    return _Runs(
        base, cand, confirmed, base_precision, cand_precision, cand_info, cand_id, base_run_id
    )


def _report(
    setup: _Setup, runs: _Runs, metrics: dict[str, Any], checks: list[GateCheck]
) -> GateReport:
    """The pipeline check and drift baseline added, both runs stored in the cache, and the
    report of it all."""
    golden, pipelines, cand, cand_info = setup.golden, setup.pipelines, runs.cand, runs.cand_info
    if pipelines is not None:
        checks.insert(
            0,
            GateCheck(
                PIPELINE_CHECK, "pass", 0.0, 0.0, "<=", pipeline_detail(pipelines[1], golden.rows)
            ),
        )
        metrics["pipeline"] = {
            "baseline": pipelines[0].describe(),
            "candidate": pipelines[1].describe(),
        }
    if golden.task == "classification":
        # the baseline the live model's drift is measured against once this one is live
        metrics["drift_baseline"] = histogram_figures(cand.outputs)
    if setup.cache is not None:
        setup.cache_info["stored"] = store_runs(
            setup.cache,
            setup.golden_keys,
            (setup.base_sha, runs.base_run_id, runs.base, runs.base_precision),
            (setup.cand_sha, runs.cand_id, cand, runs.cand_precision),
        )
    base_model, cand_model = setup.base_model, setup.cand_model
    return GateReport(
        passed=not any(c.failed for c in checks),
        checks=checks,
        metrics=metrics,
        policy=setup.policy.to_dict(),
        policy_changes=setup.changes,
        models={
            "baseline": {
                "model": str(base_model.model_path),
                "label": base_model.label,
                "sha256": setup.base_sha,
                "precision": runs.base_precision,
            },
            "candidate": {
                "model": str(cand_model.model_path),
                "label": cand_model.label,
                "sha256": setup.cand_sha,
                "precision": runs.cand_precision,
                "backend": cand_info.get("backend"),
                "provider": cand_info.get("provider"),
            },
        },
        golden=golden.describe(),
        baseline_cache=setup.cache_info,
        elapsed_s=time.perf_counter() - setup.started,
    )
