"""The golden gate: run current and candidate models on the golden set and judge the candidate."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from agent.errors import ConfigError, InputDataError, ModelError
from agent.ota.gate_cache import BaselineCache, CachedRun
from agent.ota.gate_data import (
    DETECTION_SPEC_NAME,
    GateModel,
    GoldenSet,
    check_labels_fit,
    load_golden_set,
    package_beside,
    resolve_model,
    scan_model_file,
)
from agent.ota.gate_detection import (
    COCO_MAX_DETS,
    FlatBoxes,
    coco_metrics_flat,
    flatten_boxes,
    mean_iou,
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
from agent.ota.gate_metrics import (
    agreement_metrics,
    classification_metrics_of_each,
    probabilities_of_each,
)
from agent.ota.gate_policy import (
    GatePolicy,
    PolicyChange,
    apply_package_gate,
    load_policy,
    policy_from_mapping,
)
from agent.pipeline.detection import (
    DetectionSpec,
    decode_flat,
    detection_spec_from_mapping,
    infer_layout,
)
from agent.runtime import load_backend, select_backend
from agent.runtime.base import Backend, file_sha256
from agent.textio import format_table

log = logging.getLogger(__name__)

__all__ = [
    "GateCheck",
    "GatePolicy",
    "GateReport",
    "PolicyChange",
    "load_policy",
    "run_gate",
]

ModelSource = Backend | Path | str
Progress = Callable[[float], None]

WARMUP_RUNS = 3
# The latency check compares p95s of single runs: on a loaded board that tail is the
# scheduler's (a run preempted for a few ms), and with 128 rows a handful of preempted runs
# decide it, for either model at random (measured with both cores busy: ~4 % of runs
# preempted, and 5 of 12 first passes of the same two detectors failed). So a first pass
# that fails on latency is measured again before it counts: the rows that can move either
# p95 run this many more times, interleaved, and such a row's latency is the median of its
# runs (a row counts as slow only when most of its runs were; preemption adds time to a
# run, never removes it). With 3 runs a row, 4 % preempted runs leave ~0.5 % of rows slow
# (0 of those 12 failed). A truly slower model is slow in every run and still fails; a
# first pass that passes costs nothing extra.
LATENCY_CONFIRM_PASSES = 2
# RSS is read every this many rows of the timed pass: often enough to catch growth,
# rarely enough that psutil's cost stays out of the latencies.
RSS_SAMPLE_EVERY_ROWS = 128
MB = float(1 << 20)


@dataclass(frozen=True)
class GateCheck:
    """One guard rail: the measured value, the threshold it is held to, and the verdict."""

    name: str
    verdict: str  # "pass", "fail" or "skip"
    value: float | None
    threshold: float | None
    comparison: str  # ">=" or "<=": value must be ... threshold
    detail: str

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GateReport:
    """Everything the gate measured and decided; ``to_dict()`` is the JSON report."""

    passed: bool
    checks: list[GateCheck]
    metrics: dict[str, Any]
    policy: dict[str, float]
    policy_changes: list[PolicyChange]
    models: dict[str, Any]
    golden: dict[str, Any]
    baseline_cache: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.failed]

    @property
    def ignored_policy_changes(self) -> list[PolicyChange]:
        return [c for c in self.policy_changes if not c.applied]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": "pass" if self.passed else "fail",
            "failed": [c.name for c in self.failed_checks],
            "checks": [c.to_dict() for c in self.checks],
            "policy": self.policy,
            "policy_changes": [c.to_dict() for c in self.policy_changes],
            "models": self.models,
            "golden": self.golden,
            "baseline_cache": self.baseline_cache,
            "metrics": self.metrics,
            "elapsed_s": self.elapsed_s,
            **self._margin(),
        }

    def _margin(self) -> dict[str, Any]:
        """``margin``: the check nearest to failing and by how much it passed (own units)."""
        found = smallest_margin(self.checks) if self.passed else None
        return {"margin": {"check": found[0], "value": found[1]}} if found else {}

    def format_table(self) -> str:
        """The readable summary for stdout and the log: one row per check, failures named."""
        rows = [
            [
                c.name,
                _fmt(c.value),
                f"{c.comparison} {_fmt(c.threshold)}",
                c.verdict.upper(),
                c.detail,
            ]
            for c in self.checks
        ]
        lines = [format_table(["check", "value", "threshold", "verdict", "detail"], rows)]
        for change in self.ignored_policy_changes:
            lines.append(f"package gate {change.key}={change.requested!r} ignored: {change.reason}")
        failed = self.failed_checks
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(c.detail for c in failed)
        lines.append(f"gate {verdict}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if "." in f"{value:.4f}" else str(value)


# ---------------------------------------------------------------------------------------
# Measuring: load, warm up, and one interleaved pass giving outputs and latencies
# ---------------------------------------------------------------------------------------


class _RssReader:
    """Reads this process's RSS from a kept-open /proc/self/statm (about 1 µs a read, where
    psutil opens the file each time, about 9 µs); psutil where there is no procfs."""

    def __init__(self) -> None:
        self._pid = -1
        self._fd: int | None = None
        self._page_bytes = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._process: psutil.Process | None = None

    def _reopen(self) -> None:
        # A forked child inherits the parent's statm fd, so reopen when the pid changes.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pid = os.getpid()
        self._process = psutil.Process()
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def read(self) -> int:
        if self._pid != os.getpid():
            self._reopen()
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page_bytes
            except (OSError, ValueError, IndexError):
                self._fd = None
        assert self._process is not None
        return int(self._process.memory_info().rss)


_RSS = _RssReader()


def current_rss_bytes() -> int:
    """This process's resident set size in bytes."""
    return _RSS.read()


@dataclass
class _Measured:
    """One model's outputs over the golden set, per-row latencies and RSS it added."""

    outputs: npt.NDArray[np.float32]
    latencies_s: npt.NDArray[np.float64]
    rss_added_bytes: int
    from_cache: bool = False


def backend_identity(backend: Backend) -> str:
    """Which runtime and device produced outputs: part of the baseline cache key."""
    info = backend.describe()
    return f"{info.get('backend')}|{info.get('runtime')}|{info.get('provider')}"


def predicted_identity(model: GateModel) -> str | None:
    """backend_identity() of a model before loading it (None when it cannot be known)."""
    name, _ = select_backend(model.model_path, model.backend)
    if name == "onnx":
        import onnxruntime as ort

        from agent.runtime.onnx import choose_providers

        chosen, _ = choose_providers(("auto",), ort.get_available_providers())
        return f"onnx|onnxruntime {ort.__version__}|{chosen[0]}"
    if name == "litert":
        from agent.runtime.litert import find_interpreter

        _, module = find_interpreter()
        return f"litert|{module}|cpu"
    return None


Prepare = Callable[[Backend], npt.NDArray[np.float32]]


def _tensor_inputs(golden: GoldenSet) -> Prepare:
    """A tensors golden set: every model gets inputs.npy as it is."""

    def prepare(backend: Backend) -> npt.NDArray[np.float32]:
        try:
            backend.check_input(golden.inputs)
        except InputDataError as exc:
            raise InputDataError(f"golden set does not fit the model: {exc}") from None
        return golden.inputs

    return prepare


def _load_measured(model: GateModel, prepare: Prepare) -> tuple[Backend, int, Any]:
    """Load and warm one model; returns it with the RSS that loading and warm-up added and
    its golden inputs (``prepare``; raw frames are preprocessed outside the RSS window)."""
    before = current_rss_bytes()
    backend = load_backend(model.model_path, model.backend)
    try:
        loaded = current_rss_bytes() - before
        inputs = prepare(backend)
        before_warmup = current_rss_bytes()
        first = inputs[:1]
        for _ in range(WARMUP_RUNS):
            backend.run(first)
    except BaseException:
        backend.close()
        raise
    return backend, max(0, loaded + current_rss_bytes() - before_warmup), inputs


def _interleaved_pass(
    backends: list[Backend],
    inputs: npt.NDArray[np.float32] | Sequence[npt.NDArray[np.float32]],
    progress: Progress | None,
    runs: list[Callable[[npt.NDArray[np.float32]], list[Any]]] | None = None,
) -> tuple[list[npt.NDArray[np.float32]], list[npt.NDArray[np.float64]], int]:
    """Run every row through one or two backends, one row at a time; with two, the order
    flips every row so a noisy moment hits both models alike. ``inputs`` is one array for
    all, or one per backend (raw frames preprocessed by each model's own schema). Returns
    each backend's outputs ``[rows, ...]``, per-row latencies and the RSS growth seen."""
    if len(backends) not in (1, 2):
        raise ValueError(f"the gate times one or two models, not {len(backends)}")
    per_model: list[npt.NDArray[np.float32]] = (
        list(inputs) if isinstance(inputs, (list, tuple)) else [np.asarray(inputs)] * len(backends)
    )
    rows = len(per_model[0])
    # One untimed probe per model gives the output layout every row must keep.
    if runs is None:
        runs = [b.run for b in backends]
    firsts = [np.asarray(run(x[:1])[0]) for run, x in zip(runs, per_model)]
    for backend, first in zip(backends, firsts):
        if first.ndim == 0 or first.shape[0] != 1:
            raise ModelError(
                f"{backend.path}: output shape {list(first.shape)} for one input row "
                "(expected a leading batch dimension of 1)"
            )
    row_bytes: list[list[bytes]] = [[] for _ in backends]
    row_latencies: list[list[float]] = [[] for _ in backends]
    rss_start = rss_peak = current_rss_bytes()
    # Rows go in chunks; RSS and progress are read between chunks, never between rows.
    chunk = RSS_SAMPLE_EVERY_ROWS
    if progress is not None:
        chunk = max(1, min(chunk, rows // 50))
    rss_window = 0
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        if len(runs) == 2:
            _timed_rows_pair(
                runs[0], runs[1], per_model[0], start, stop, row_bytes, row_latencies, per_model[1]
            )
        else:
            _timed_rows_single(runs[0], per_model[0], start, stop, row_bytes[0], row_latencies[0])
        if stop // RSS_SAMPLE_EVERY_ROWS != rss_window:
            rss_window = stop // RSS_SAMPLE_EVERY_ROWS
            rss_peak = max(rss_peak, current_rss_bytes())
        if progress is not None:
            progress(stop / rows)
    rss_peak = max(rss_peak, current_rss_bytes())
    outputs = [
        _stack_rows(backend, first, parts, rows)
        for backend, first, parts in zip(backends, firsts, row_bytes)
    ]
    latencies = [np.array(lats, dtype=np.float64) for lats in row_latencies]
    return outputs, latencies, rss_peak - rss_start


def _timed_rows_pair(
    run_a: Callable[[npt.NDArray[np.float32]], list[Any]],
    run_b: Callable[[npt.NDArray[np.float32]], list[Any]],
    inputs: npt.NDArray[np.float32],
    start: int,
    stop: int,
    row_bytes: list[list[bytes]],
    row_latencies: list[list[float]],
    inputs_b: npt.NDArray[np.float32] | None = None,
) -> None:
    """The timed loop for two models, kept as lean as a bare loop of run() calls: the clock
    read between the two runs ends the first one's time and starts the second's, and each
    output is kept as bytes (cheaper per row than copying into a preallocated array).
    ``inputs_b``: the second model's own rows when its preprocessing differs."""
    clock = time.perf_counter
    put_a, put_b = row_bytes[0].append, row_bytes[1].append
    time_a, time_b = row_latencies[0].append, row_latencies[1].append
    same = inputs_b is None or inputs_b is inputs
    other = inputs if inputs_b is None else inputs_b
    for row in range(start, stop):
        x = inputs[row : row + 1]
        x_b = x if same else other[row : row + 1]
        if row & 1:
            t0 = clock()
            y_b = run_b(x_b)[0]
            t1 = clock()
            y_a = run_a(x)[0]
            t2 = clock()
            time_b(t1 - t0)
            time_a(t2 - t1)
        else:
            t0 = clock()
            y_a = run_a(x)[0]
            t1 = clock()
            y_b = run_b(x_b)[0]
            t2 = clock()
            time_a(t1 - t0)
            time_b(t2 - t1)
        put_a(y_a.tobytes())
        put_b(y_b.tobytes())


def _timed_rows_single(
    run: Callable[[npt.NDArray[np.float32]], list[Any]],
    inputs: npt.NDArray[np.float32],
    start: int,
    stop: int,
    row_bytes: list[bytes],
    row_latencies: list[float],
) -> None:
    """The timed loop for one model (the baseline came from the cache)."""
    clock = time.perf_counter
    put, took = row_bytes.append, row_latencies.append
    for row in range(start, stop):
        x = inputs[row : row + 1]
        t0 = clock()
        y = run(x)[0]
        t1 = clock()
        took(t1 - t0)
        put(y.tobytes())


def _latency_fails(
    policy: GatePolicy, base_s: npt.NDArray[np.float64], cand_s: npt.NDArray[np.float64]
) -> bool:
    """Whether these per-row latencies fail the latency_p95 check."""
    base, cand = latency_summaries_ms(base_s, cand_s)
    limit = policy.latency_p95_ratio_max * base["p95_ms"] + policy.latency_p95_slack_ms
    return bool(cand["p95_ms"] > limit)


@dataclass(frozen=True)
class _ConfirmedLatency:
    """Per-row latencies judged after a failing first pass, and how many rows ran again."""

    baseline_s: npt.NDArray[np.float64]
    candidate_s: npt.NDArray[np.float64]
    rows_timed_again: int


def _confirm_latency(
    run_base: Callable[[npt.NDArray[np.float32]], list[Any]],
    run_cand: Callable[[npt.NDArray[np.float32]], list[Any]],
    inputs: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    first_s: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
) -> _ConfirmedLatency:
    """Time the rows in question LATENCY_CONFIRM_PASSES more times, interleaved (the order
    of the two models flips every row and every pass), and give each its median run.

    The rows in question are those where either model's first run was above the lower of
    the two p95s: only they can move either p95 (every other row is under both already),
    so a noisy pass costs a few rows, and a truly slower candidate (every row above the
    baseline's p95) is timed again in full. Without a first pass of both side by side
    (``first_s`` None: the baseline's came from the cache) every row runs one more time
    instead. The outputs of these runs are not kept (the first pass's are judged).
    ``inputs``: the baseline's and the candidate's golden rows (raw frames may be
    preprocessed differently for each)."""
    base_x, cand_x = inputs
    if first_s is None:
        rows = np.arange(len(cand_x))
        runs: list[list[npt.NDArray[np.float64]]] = [[], []]
        passes = LATENCY_CONFIRM_PASSES + 1
    else:
        line = min(float(np.percentile(first_s[0], 95)), float(np.percentile(first_s[1], 95)))
        rows = np.flatnonzero(np.maximum(first_s[0], first_s[1]) > line)
        runs = [[first_s[0][rows]], [first_s[1][rows]]]
        passes = LATENCY_CONFIRM_PASSES
    subset = np.ascontiguousarray(base_x[rows])
    subset_c = subset if cand_x is base_x else np.ascontiguousarray(cand_x[rows])
    for n in range(passes if len(rows) else 0):
        lats: list[list[float]] = [[], []]
        # odd passes start with the candidate, so each row sees both orders
        if n % 2:
            _timed_rows_pair(run_base, run_cand, subset, 0, len(rows), [[], []], lats, subset_c)
        else:
            _timed_rows_pair(run_cand, run_base, subset_c, 0, len(rows), [[], []], lats, subset)
        mine = (lats[0], lats[1]) if n % 2 else (lats[1], lats[0])
        for role in (0, 1):
            runs[role].append(np.asarray(mine[role], dtype=np.float64))
    judged = []
    for role in (0, 1):
        out = np.zeros(len(cand_x)) if first_s is None else first_s[role].copy()
        if len(rows):
            out[rows] = np.median(np.stack(runs[role]), axis=0)
        judged.append(out)
    return _ConfirmedLatency(judged[0], judged[1], len(rows))


def _packed_run(backend: Backend) -> Callable[[npt.NDArray[np.float32]], list[Any]]:
    """A multi-output detector's run (SSD: boxes, classes, scores, count) with every output
    of the row flattened into one float32 row, so the pass keeps them all in one array;
    detection_metrics() splits them again."""
    run = backend.run

    def packed(x: npt.NDArray[np.float32]) -> list[Any]:
        parts = [np.asarray(o, dtype=np.float32).reshape(1, -1) for o in run(x)]
        return [np.concatenate(parts, axis=1)]

    return packed


def _ssd_outputs(packed: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """Packed SSD rows [N, 6K (+1)] back into boxes [N,K,4], classes [N,K], scores [N,K] and
    count [N] when present (6K + 1 values a row)."""
    rows, total = packed.shape[0], int(np.prod(packed.shape[1:]))
    flat = packed.reshape(rows, total)
    k = (total - 1) // 6 if total % 6 == 1 else total // 6
    if k < 1 or total not in (6 * k, 6 * k + 1):
        raise ModelError(f"ssd outputs of {total} values a row are not boxes, classes, scores")
    parts = [flat[:, : 4 * k].reshape(rows, k, 4), flat[:, 4 * k : 5 * k], flat[:, 5 * k : 6 * k]]
    if total == 6 * k + 1:
        parts.append(flat[:, 6 * k])
    return parts


def _stack_rows(
    backend: Backend, first: npt.NDArray[Any], parts: list[bytes], rows: int
) -> npt.NDArray[np.float32]:
    """One model's per-row output bytes as a float32 array ``[rows, ...]``; every row must
    have the probe run's size (a model whose output changes size between rows is refused)."""
    if len(parts) != rows or any(len(p) != first.nbytes for p in parts):
        raise ModelError(f"{backend.path}: output shape changed between rows")
    flat = np.frombuffer(b"".join(parts), dtype=first.dtype)
    stacked: npt.NDArray[np.float32] = flat.reshape(rows, *first.shape[1:]).astype(np.float32)
    return stacked


def _detect_precision(model: GateModel, backend: Backend | None) -> str:
    if backend is not None:
        specs = (*backend.inputs, *backend.outputs)
        if any(s.quantization is not None or s.dtype in ("int8", "uint8") for s in specs):
            return "int8"
        if model.precision == "unknown" and backend.name == "litert":
            return "fp32"
    return model.precision


# ---------------------------------------------------------------------------------------
# Judging: the checks of DESIGN §7 over the measured outputs
# ---------------------------------------------------------------------------------------


def _check(name: str, value: float, threshold: float, comparison: str, detail: str) -> GateCheck:
    ok = value >= threshold if comparison == ">=" else value <= threshold
    return GateCheck(name, "pass" if ok else "fail", value, threshold, comparison, detail)


def classification_checks(
    policy: GatePolicy,
    base: Mapping[str, Any],
    cand: Mapping[str, Any],
    agreement: Mapping[str, float],
    same_precision: bool | None,
) -> list[GateCheck]:
    """Accuracy, F1, calibration, agreement, closeness and per-class recall checks."""
    checks: list[GateCheck] = []
    d_acc = (cand["accuracy"] - base["accuracy"]) * 100.0
    checks.append(
        _check(
            "accuracy",
            d_acc,
            -policy.accuracy_drop_max_pp,
            ">=",
            f"accuracy {base['accuracy']:.2%} -> {cand['accuracy']:.2%} ({d_acc:+.2f} pp)",
        )
    )
    d_f1 = (cand["macro_f1"] - base["macro_f1"]) * 100.0
    checks.append(
        _check(
            "macro_f1",
            d_f1,
            -policy.f1_drop_max_pp,
            ">=",
            f"macro F1 {base['macro_f1']:.4f} -> {cand['macro_f1']:.4f} ({d_f1:+.2f} pp)",
        )
    )
    d_ece = cand["ece"] - base["ece"]
    checks.append(
        _check(
            "ece",
            d_ece,
            policy.ece_increase_max,
            "<=",
            f"ECE {base['ece']:.4f} -> {cand['ece']:.4f} ({d_ece:+.4f})",
        )
    )
    agree, mse = agreement["top1_agreement"], agreement["prob_mse"]
    agree_ok = agree >= policy.agreement_min or mse <= policy.prob_mse_max
    checks.append(
        GateCheck(
            "agreement",
            "pass" if agree_ok else "fail",
            agree,
            policy.agreement_min,
            ">=",
            f"top-1 agreement {agree:.2%} (min {policy.agreement_min:.2%}) or softmax MSE "
            f"{mse:.2e} (max {policy.prob_mse_max:.1e})",
        )
    )
    cos = agreement["logit_cosine"]
    if same_precision:
        checks.append(
            _check(
                "logit_cosine",
                cos,
                policy.logit_cosine_min,
                ">=",
                f"logit cosine {cos:.5f} (same precision)",
            )
        )
    else:
        why = "different precision" if same_precision is False else "precision unknown"
        checks.append(
            GateCheck(
                "logit_cosine",
                "skip",
                cos,
                policy.logit_cosine_min,
                ">=",
                f"logit cosine {cos:.5f} not checked ({why})",
            )
        )
    drops = []
    for b, c in zip(base["per_class"], cand["per_class"]):
        if b["support"] > 0:
            drops.append(((b["recall"] - c["recall"]) * 100.0, b["class"], b, c))
    if drops:
        drop, cls, b, c = max(drops, key=lambda d: d[0])
        checks.append(
            _check(
                "class_recall",
                drop,
                policy.class_recall_drop_max_pp,
                "<=",
                f"class {cls} recall {b['recall']:.2%} -> {c['recall']:.2%} "
                f"({-drop:+.1f} pp, worst class)",
            )
        )
    return checks


def latency_memory_checks(
    policy: GatePolicy, latency: Mapping[str, Any], rss_added_mb: float
) -> list[GateCheck]:
    base_p95 = latency["baseline"]["p95_ms"]
    cand_p95 = latency["candidate"]["p95_ms"]
    limit = policy.latency_p95_ratio_max * base_p95 + policy.latency_p95_slack_ms
    how = ""
    runs = int(latency.get("runs_per_row") or 1)
    first = latency.get("first_pass")
    if runs > 1 and isinstance(first, Mapping):
        how = (
            f"; median of {runs} runs for {latency.get('rows_timed_again', 0)} rows timed "
            f"again, the first pass's p95 {first['baseline']['p95_ms']:.3f} ms -> "
            f"{first['candidate']['p95_ms']:.3f} ms"
        )
    return [
        _check(
            "latency_p95",
            cand_p95,
            limit,
            "<=",
            f"p95 {base_p95:.3f} ms -> {cand_p95:.3f} ms (limit {limit:.3f} ms{how})",
        ),
        _check(
            "memory",
            rss_added_mb,
            policy.memory_added_max_mb,
            "<=",
            f"candidate added {rss_added_mb:.1f} MB RSS",
        ),
    ]


def segmentation_checks(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    d = (cand["miou"] - base["miou"]) * 100.0
    return [
        _check(
            "miou",
            d,
            -policy.miou_drop_max_pp,
            ">=",
            f"mIoU {base['miou']:.4f} -> {cand['miou']:.4f} ({d:+.2f} pp)",
        )
    ]


def detection_checks(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    """ΔmAP@0.5 from two detection_map() results, naming the class whose AP fell most."""
    d = (cand["map"] - base["map"]) * 100.0
    worst = ""
    drops = {
        k: base["per_class_ap"][k] - cand["per_class_ap"].get(k, 0.0) for k in base["per_class_ap"]
    }
    if drops:
        k = max(drops, key=lambda key: drops[key])
        worst = f"; worst class {k} AP {-drops[k] * 100:+.1f} pp"
    return [
        _check(
            "map50",
            d,
            -policy.map_drop_max_pp,
            ">=",
            f"mAP@0.5 {base['map']:.4f} -> {cand['map']:.4f} ({d:+.2f} pp{worst})",
        )
    ]


def detection_gate_checks(
    policy: GatePolicy,
    base: Mapping[str, Any],
    cand: Mapping[str, Any],
    class_names: Sequence[str] = (),
) -> list[GateCheck]:
    """ΔmAP@0.5, ΔmAP@0.5:0.95 and the worst per-class AP@0.5 drop, from two
    coco_detection_metrics() results; the class whose AP fell most is named."""

    def name(k: str) -> str:
        i = int(k)
        return f"class {k} ({class_names[i]})" if 0 <= i < len(class_names) else f"class {k}"

    d50 = (cand["map50"] - base["map50"]) * 100.0
    d5095 = (cand["map50_95"] - base["map50_95"]) * 100.0
    base_ap, cand_ap = base["per_class_ap50"], cand["per_class_ap50"]
    drops = {k: (base_ap[k] - cand_ap.get(k, 0.0)) * 100.0 for k in base_ap}
    checks = [
        _check(
            "map50",
            d50,
            -policy.map_drop_max_pp,
            ">=",
            f"mAP@0.5 {base['map50']:.4f} -> {cand['map50']:.4f} ({d50:+.2f} pp)",
        ),
        _check(
            "map50_95",
            d5095,
            -policy.map50_95_drop_max_pp,
            ">=",
            f"mAP@0.5:0.95 {base['map50_95']:.4f} -> {cand['map50_95']:.4f} ({d5095:+.2f} pp)",
        ),
    ]
    if drops:
        worst = max(drops, key=lambda k: drops[k])
        checks.append(
            _check(
                "class_ap",
                drops[worst],
                policy.class_ap_drop_max_pp,
                "<=",
                f"{name(worst)} AP@0.5 {base_ap[worst]:.4f} -> {cand_ap.get(worst, 0.0):.4f} "
                f"({-drops[worst]:+.1f} pp, worst class)",
            )
        )
    return checks


def detection_spec_of(
    model: GateModel, golden: GoldenSet, output_shape: Sequence[int]
) -> DetectionSpec:
    """How to decode a model's outputs: its package's `detection` block, else the golden
    set's detection.yaml, else the defaults with the layout guessed from the output."""
    block = (model.manifest or {}).get("detection")
    if isinstance(block, Mapping):
        return detection_spec_from_mapping(block, f"{model.label}: manifest")
    if golden.detection is not None:
        return detection_spec_from_mapping(golden.detection, str(golden.path / DETECTION_SPEC_NAME))
    return DetectionSpec(layout=infer_layout([tuple(output_shape)]))


def golden_image_size(golden: GoldenSet) -> tuple[int, int]:
    """(height, width) of the golden inputs: NCHW when the second axis looks like channels."""
    shape = golden.inputs.shape
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return int(shape[2]), int(shape[3])
    if len(shape) >= 3:
        return int(shape[1]), int(shape[2])
    return 1, 1


def detection_metrics(
    golden: GoldenSet, outputs: npt.NDArray[np.float32], spec: DetectionSpec
) -> dict[str, Any]:
    """Decode one model's golden-set outputs with its spec and score them (COCO rules)."""
    assert golden.boxes is not None
    num_classes = len(golden.class_names)
    if spec.layout == "ssd":
        parts = _ssd_outputs(outputs)
    else:
        width = outputs.shape[2] if spec.layout == "yolo" and outputs.ndim == 3 else 0
        if spec.layout == "yolo_transposed" and outputs.ndim == 3:
            width = outputs.shape[1]
        model_classes = width - (5 if spec.layout == "yolo" else 4)
        if outputs.ndim != 3 or model_classes != num_classes:
            raise ModelError(
                f"{spec.layout} output {list(outputs.shape[1:])} does not fit the golden set's "
                f"{num_classes} categories"
            )
        parts = [outputs]
    flat = decode_flat(parts, spec, golden_image_size(golden))
    result = coco_metrics_flat(
        flat_ground_truth(golden), flat, num_classes, min(spec.max_detections, COCO_MAX_DETS)
    )
    result["boxes_per_image"] = result["det_boxes"] / max(1, golden.rows)
    # the daemon's per-frame confidence for a detector: its best box's score (0 without)
    best = np.zeros(golden.rows)
    np.maximum.at(best, flat[0], flat[3])
    result["top_score_mean"] = float(best.mean())
    # what probation holds a detector's live boxes to (agent.ota.probation.box_collapse)
    result["box_score_mean"] = float(flat[3].mean()) if len(flat[3]) else 0.0
    return result


_FLAT_GT: dict[str, FlatBoxes] = {}


def flat_ground_truth(golden: GoldenSet) -> FlatBoxes:
    """The golden boxes as flat arrays, made once per golden set (keyed by its hash)."""
    assert golden.boxes is not None
    key = f"{golden.sha256}:{len(golden.class_names)}"
    if key not in _FLAT_GT:
        _FLAT_GT.clear()  # one golden set per device: keep only the latest
        _FLAT_GT[key] = flatten_boxes(golden.boxes, len(golden.class_names))
    return _FLAT_GT[key]


# ---------------------------------------------------------------------------------------
# The API the CLI and the OTA client call
# ---------------------------------------------------------------------------------------


def _as_model(source: ModelSource, backend: str) -> tuple[GateModel, Backend | None]:
    if isinstance(source, Backend):
        sha256, precision = scan_model_file(source.path, onnx=source.name == "onnx")
        # a loaded package model: its manifest names the output layout (detection) and
        # the preprocessing raw golden frames go through
        found = package_beside(Path(source.path))
        manifest, folder = found if found is not None else (None, None)
        return GateModel(source.path, source.name, precision, manifest, sha256, folder), source
    return resolve_model(Path(source), backend), None


def _resolve_policy(
    policy: GatePolicy | Mapping[str, Any] | Path | str | None, golden_dir: Path
) -> GatePolicy:
    if isinstance(policy, GatePolicy):
        return policy
    if isinstance(policy, Mapping):
        return policy_from_mapping(policy)
    if policy is not None:
        return load_policy(Path(policy))
    default = golden_dir / "policy.yaml"
    return load_policy(default) if default.is_file() else GatePolicy()


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
    device_policy = _resolve_policy(policy, golden_dir)
    base_model, base_backend = _as_model(baseline, backend)
    cand_model, cand_backend = _as_model(candidate, backend)
    if package_gate is None:
        package_gate = cand_model.package_gate
    effective, changes = apply_package_gate(device_policy, package_gate)
    for change in changes:
        if not change.applied:
            log.warning(
                "package gate %s=%r ignored: %s", change.key, change.requested, change.reason
            )

    cache = BaselineCache(Path(baseline_cache)) if baseline_cache is not None else None
    cache_info: dict[str, Any] = {"enabled": cache is not None, "used": False}
    # Resolving a model read its file once for both its precision and its hash.
    base_sha = base_model.sha256 or file_sha256(base_model.model_path)
    cand_sha = cand_model.sha256 or file_sha256(cand_model.model_path)
    # Raw frames: each model's own preprocessing makes its inputs, and the same frames
    # preprocessed another way are other inputs (part of the cache key).
    pipelines: tuple[ModelPipeline, ModelPipeline] | None = None
    base_golden_key = cand_golden_key = golden.sha256
    if golden.form == "frames":
        try:
            base_pipe = model_pipeline(base_model, golden)
        except ConfigError as exc:
            raise InputDataError(f"the current model's preprocessing: {exc}") from None
        try:
            cand_pipe = model_pipeline(cand_model, golden)
        except ConfigError as exc:
            return _pipeline_refused(
                golden, effective, changes, base_model, cand_model, str(exc), golden.rows, started
            )
        pipelines = (base_pipe, cand_pipe)
        base_golden_key = base_pipe.cache_key(golden.sha256)
        cand_golden_key = cand_pipe.cache_key(golden.sha256)
    cached: CachedRun | None = None
    if cache is not None:
        base_id = backend_identity(base_backend) if base_backend else predicted_identity(base_model)
        if base_id is not None:
            cached = cache.load(base_sha, base_golden_key, base_id, golden.rows)
        cache_info.update({"path": str(cache.root), "backend": base_id, "used": cached is not None})

    def prepare(role: int) -> Prepare:
        if pipelines is None:
            return _tensor_inputs(golden)
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

    # Load (and time the loading RSS of) whatever must run, baseline first.
    to_run: list[Backend] = []
    inputs: list[npt.NDArray[np.float32]] = []
    rss_added: dict[str, int] = {}
    owned: list[Backend] = []

    def ready(
        role: int, backend: Backend | None, model: GateModel
    ) -> tuple[Backend, int, npt.NDArray[np.float32]]:
        """``model`` loaded (unless given), with the RSS its loading added and its inputs."""
        if backend is None:
            backend, rss, x = _load_measured(model, prepare(role))
            owned.append(backend)
            return backend, rss, x
        return backend, 0, prepare(role)(backend)

    try:
        if cached is None:
            base_backend, rss_added["baseline"], base_x = ready(0, base_backend, base_model)
            to_run.append(base_backend)
            inputs.append(base_x)
        cand_backend, rss_added["candidate"], cand_x = ready(1, cand_backend, cand_model)
        to_run.append(cand_backend)
        inputs.append(cand_x)

        def run_of(b: Backend) -> Callable[[npt.NDArray[np.float32]], list[Any]]:
            return _packed_run(b) if golden.task == "detection" and len(b.outputs) > 1 else b.run

        runs = [run_of(b) for b in to_run]
        outs, lats, pass_growth = _interleaved_pass(to_run, inputs, progress, runs)
        first_lats = (cached.latencies_s if cached is not None else lats[0], lats[-1])
        confirmed: _ConfirmedLatency | None = None
        if _latency_fails(effective, *first_lats):
            if cached is None:
                pair_x = (inputs[0], cand_x)
            else:
                # the cached latencies are from another minute: time both side by side now
                base_backend, _, base_x = ready(0, base_backend, base_model)
                runs.insert(0, run_of(base_backend))
                pair_x = (base_x, cand_x)
            confirmed = _confirm_latency(
                runs[0], runs[-1], pair_x, first_lats if cached is None else None
            )
        cand_info = cand_backend.describe()
        cand_id = backend_identity(cand_backend)
        base_run_id = backend_identity(to_run[0]) if cached is None else None
        if pipelines is not None:
            check_outputs(outs[-1], pipelines[1], golden, cand_backend)
    except PipelineRefused as exc:
        return _pipeline_refused(
            golden, effective, changes, base_model, cand_model, exc.reason, exc.failed_rows, started
        )
    finally:
        for loaded in owned:
            loaded.close()

    cand = _Measured(outs[-1], lats[-1], rss_added["candidate"] + max(0, pass_growth))
    if cached is not None:
        base = _Measured(cached.outputs, cached.latencies_s, cached.rss_added_bytes, True)
    else:
        base = _Measured(outs[0], lats[0], rss_added["baseline"])
    # A detector may change its layout (YOLO -> SSD): boxes are compared, not raw outputs.
    if golden.task != "detection" and base.outputs.shape[1:] != cand.outputs.shape[1:]:
        raise ModelError(
            f"{cand_model.model_path}: output shape {list(cand.outputs.shape[1:])} differs from "
            f"the current model's {list(base.outputs.shape[1:])} (different output size)"
        )
    base_precision = (
        str(cached.meta.get("precision", base_model.precision))
        if cached is not None
        else _detect_precision(base_model, base_backend)
    )
    cand_precision = _detect_precision(cand_model, cand_backend)

    metrics, checks = _judge(
        golden,
        effective,
        base,
        cand,
        base_precision,
        cand_precision,
        cand_model.labels or base_model.labels,
        (
            detection_spec_of(base_model, golden, base.outputs.shape),
            detection_spec_of(cand_model, golden, cand.outputs.shape),
        )
        if golden.task == "detection"
        else None,
        confirmed,
    )

    if pipelines is not None:
        checks.insert(
            0,
            GateCheck(
                PIPELINE_CHECK,
                "pass",
                0.0,
                0.0,
                "<=",
                pipeline_detail(pipelines[1], golden.rows),
            ),
        )
        metrics["pipeline"] = {
            "baseline": pipelines[0].describe(),
            "candidate": pipelines[1].describe(),
        }
    if golden.task == "classification":
        # the baseline the live model's drift is measured against once this one is live
        metrics["drift_baseline"] = histogram_figures(cand.outputs)
    if cache is not None:
        cache_info["stored"] = _store_runs(
            cache,
            (base_golden_key, cand_golden_key),
            (base_sha, base_run_id, base, base_precision),
            (cand_sha, cand_id, cand, cand_precision),
        )
    report = GateReport(
        passed=not any(c.failed for c in checks),
        checks=checks,
        metrics=metrics,
        policy=effective.to_dict(),
        policy_changes=changes,
        models={
            "baseline": {
                "model": str(base_model.model_path),
                "label": base_model.label,
                "sha256": base_sha,
                "precision": base_precision,
            },
            "candidate": {
                "model": str(cand_model.model_path),
                "label": cand_model.label,
                "sha256": cand_sha,
                "precision": cand_precision,
                "backend": cand_info.get("backend"),
                "provider": cand_info.get("provider"),
            },
        },
        golden=golden.describe(),
        baseline_cache=cache_info,
        elapsed_s=time.perf_counter() - started,
    )
    log.info("gate %s for %s", "passed" if report.passed else "FAILED", cand_model.label)
    return report


def _pipeline_refused(
    golden: GoldenSet,
    policy: GatePolicy,
    changes: list[PolicyChange],
    base_model: GateModel,
    cand_model: GateModel,
    reason: str,
    failed_rows: int,
    started: float,
) -> GateReport:
    """The report of a candidate whose preprocess, model or postprocess does not work on
    the golden frames: one failed ``pipeline`` check naming why; nothing else is judged."""
    check = GateCheck(
        PIPELINE_CHECK,
        "fail",
        float(failed_rows),
        0.0,
        "<=",
        f"{failed_rows} of {golden.rows} golden frames failed: {reason}",
    )
    log.info("gate FAILED for %s: %s", cand_model.label, check.detail)
    return GateReport(
        passed=False,
        checks=[check],
        metrics={"task": golden.task, "pipeline": {"failed_rows": failed_rows, "reason": reason}},
        policy=policy.to_dict(),
        policy_changes=changes,
        models={
            "baseline": {"model": str(base_model.model_path), "label": base_model.label},
            "candidate": {"model": str(cand_model.model_path), "label": cand_model.label},
        },
        golden=golden.describe(),
        elapsed_s=time.perf_counter() - started,
    )


def smallest_margin(checks: Sequence[GateCheck]) -> tuple[str, float] | None:
    """The check nearest to failing and its margin to the threshold, in that check's own
    units (positive: passing by that much). Checks are compared by margin relative to the
    threshold so that milliseconds, MB and pp can be ranked; skipped checks and the
    pipeline check (a count of failed frames) do not count."""
    best: tuple[float, str, float] | None = None
    for c in checks:
        if c.verdict == "skip" or c.name == PIPELINE_CHECK:
            continue
        if c.value is None or c.threshold is None:
            continue
        margin = c.value - c.threshold if c.comparison == ">=" else c.threshold - c.value
        if margin < 0:
            continue  # passed by its alternative rule (agreement: the softmax MSE)
        relative = margin / max(abs(c.threshold), 1e-9)
        if best is None or relative < best[0]:
            best = (relative, c.name, float(margin))
    return None if best is None else (best[1], best[2])


PERCENTILES = (50.0, 95.0, 99.0)


def _percentile_sorted(ordered: list[float], q: float) -> float:
    """numpy's default ("linear") percentile of an already sorted list, in plain floats:
    np.percentile costs ~100 µs a call on a cold cache, this ~1 µs."""
    position = (len(ordered) - 1) * q / 100.0
    lo = int(position)
    hi = min(lo + 1, len(ordered) - 1)
    frac = position - lo
    a, b = ordered[lo], ordered[hi]
    # The same two-sided interpolation as numpy's _lerp, so the values match to the last bit
    # or nearly (it differs only in how the position itself is rounded).
    return b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac


def latency_summaries_ms(
    *latencies_s: npt.NDArray[np.float64],
) -> list[dict[str, float]]:
    """P50/P95/P99/mean in ms of each model's per-row latencies (np.percentile's method);
    equal-length series are sorted together in one call."""
    if not latencies_s:
        return []
    lengths = {len(lat) for lat in latencies_s}
    if len(lengths) > 1 or 0 in lengths:
        return [
            latency_summaries_ms(lat)[0]
            if len(lat)
            else {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
            for lat in latencies_s
        ]
    ms = np.sort(np.stack(latencies_s).astype(np.float64, copy=False), axis=1) * 1000.0
    means = ms.mean(axis=1).tolist()
    out: list[dict[str, float]] = []
    for ordered, mean in zip(ms.tolist(), means):
        p50, p95, p99 = (_percentile_sorted(ordered, q) for q in PERCENTILES)
        out.append({"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": mean})
    return out


def _judge(
    golden: GoldenSet,
    policy: GatePolicy,
    base: _Measured,
    cand: _Measured,
    base_precision: str,
    cand_precision: str,
    class_names: list[str] | None,
    detection_specs: tuple[DetectionSpec, DetectionSpec] | None = None,
    confirmed: _ConfirmedLatency | None = None,
) -> tuple[dict[str, Any], list[GateCheck]]:
    known = "unknown" not in (base_precision, cand_precision)
    same_precision = (base_precision == cand_precision) if known else None
    base_ms, cand_ms = latency_summaries_ms(base.latencies_s, cand.latencies_s)
    latency: dict[str, Any] = {
        "baseline": base_ms,
        "candidate": cand_ms,
        "baseline_from_cache": base.from_cache,
        "runs_per_row": 1,
    }
    if confirmed is not None:
        # judged on the confirming passes; the first pass stays in the report
        latency["first_pass"] = {"baseline": base_ms, "candidate": cand_ms}
        latency["baseline"], latency["candidate"] = latency_summaries_ms(
            confirmed.baseline_s, confirmed.candidate_s
        )
        latency["runs_per_row"] = LATENCY_CONFIRM_PASSES + 1
        latency["rows_timed_again"] = confirmed.rows_timed_again
        latency["baseline_from_cache"] = False
    memory = {
        "baseline_rss_added_mb": base.rss_added_bytes / MB,
        "candidate_rss_added_mb": cand.rss_added_bytes / MB,
    }
    metrics: dict[str, Any] = {"task": golden.task, "latency": latency, "memory": memory}
    checks: list[GateCheck] = []
    if golden.task == "detection":
        assert detection_specs is not None
        b, c = (
            detection_metrics(golden, measured.outputs, spec)
            for measured, spec in zip((base, cand), detection_specs)
        )
        metrics.update({"baseline": b, "candidate": c})
        metrics["detection"] = {
            "baseline": detection_specs[0].to_dict(),
            "candidate": detection_specs[1].to_dict(),
        }
        checks += detection_gate_checks(policy, b, c, golden.class_names)
    elif golden.task == "segmentation":
        if base.outputs.ndim != 4 or base.outputs.shape[2:] != golden.labels.shape[1:]:
            raise ModelError(
                f"segmentation output shape {list(base.outputs.shape[1:])} does not match "
                f"the label masks {list(golden.labels.shape[1:])}"
            )
        classes = int(base.outputs.shape[1])
        check_labels_fit(golden, classes)
        b = mean_iou(golden.labels, base.outputs.argmax(axis=1), classes)
        c = mean_iou(golden.labels, cand.outputs.argmax(axis=1), classes)
        metrics.update({"baseline": b, "candidate": c})
        checks += segmentation_checks(policy, b, c)
    else:
        if base.outputs.ndim != 2:
            raise ModelError(
                f"classification needs outputs [N, classes], got {list(base.outputs.shape)}"
            )
        classes = int(base.outputs.shape[1])
        check_labels_fit(golden, classes)
        # Both models in one set of numpy calls: on a cache-cold CPU right after the timed
        # pass, each call costs several µs whatever the array size.
        probs = probabilities_of_each([base.outputs, cand.outputs])
        b, c = classification_metrics_of_each(
            [base.outputs, cand.outputs], golden.labels, golden.slices, class_names, probs
        )
        agreement = agreement_metrics(base.outputs, cand.outputs, probs[0], probs[1])
        metrics.update({"baseline": b, "candidate": c, "agreement": agreement})
        if golden.reference is not None and golden.reference.shape == cand.outputs.shape:
            # Informational: how far each model is from the trusted reference outputs.
            metrics["reference"] = {
                "baseline": agreement_metrics(golden.reference, base.outputs),
                "candidate": agreement_metrics(golden.reference, cand.outputs),
            }
        checks += classification_checks(policy, b, c, agreement, same_precision)
    checks += latency_memory_checks(policy, latency, cand.rss_added_bytes / MB)
    return metrics, checks


def _store_runs(
    cache: BaselineCache,
    golden_keys: tuple[str, str],
    baseline: tuple[str, str | None, _Measured, str],
    candidate: tuple[str, str | None, _Measured, str],
) -> list[str]:
    """Store this run for next time: the baseline when it ran (its backend id is None when
    it came from the cache), and the candidate, the next gate's baseline once activated.
    Each run is (model sha256, backend id, measured, precision); ``golden_keys`` are the
    golden set's hash for each (with its preprocessing, for raw frames)."""
    stored: list[str] = []
    try:
        for role, golden_key, (sha, backend_id, measured, precision) in (
            ("baseline", golden_keys[0], baseline),
            ("candidate", golden_keys[1], candidate),
        ):
            if backend_id is None or measured.from_cache:
                continue
            cache.store(
                sha,
                golden_key,
                backend_id,
                measured.outputs,
                measured.latencies_s,
                measured.rss_added_bytes,
                {"precision": precision, "role": role},
            )
            stored.append(role)
    except OSError as exc:
        # A full or read-only disk must not turn a gate verdict into a crash.
        log.warning("gate cache %s not written: %s", cache.root, exc)
    return stored
