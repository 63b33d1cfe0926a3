"""Measuring the gate's models: load and warm up, one interleaved timed pass, latency
confirmation, RSS, and the latency summaries."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from agent.errors import InputDataError, ModelError
from agent.ota.gate_data import GateModel, GoldenSet
from agent.ota.gate_policy import GatePolicy
from agent.pipeline.latency import PERCENTILES, percentile, sorted_percentile
from agent.runtime import load_backend, select_backend
from agent.runtime.base import Backend

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
class Measured:
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


def tensor_inputs(golden: GoldenSet) -> Prepare:
    """A tensors golden set: every model gets inputs.npy as it is."""

    def prepare(backend: Backend) -> npt.NDArray[np.float32]:
        try:
            backend.check_input(golden.inputs)
        except InputDataError as exc:
            raise InputDataError(f"golden set does not fit the model: {exc}") from None
        return golden.inputs

    return prepare


def load_measured(model: GateModel, prepare: Prepare) -> tuple[Backend, int, Any]:
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


def interleaved_pass(
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


def latency_fails(
    policy: GatePolicy, base_s: npt.NDArray[np.float64], cand_s: npt.NDArray[np.float64]
) -> bool:
    """Whether these per-row latencies fail the latency_p95 check."""
    base, cand = latency_summaries_ms(base_s, cand_s)
    limit = policy.latency_p95_ratio_max * base["p95_ms"] + policy.latency_p95_slack_ms
    return bool(cand["p95_ms"] > limit)


@dataclass(frozen=True)
class ConfirmedLatency:
    """Per-row latencies judged after a failing first pass, and how many rows ran again."""

    baseline_s: npt.NDArray[np.float64]
    candidate_s: npt.NDArray[np.float64]
    rows_timed_again: int


def confirm_latency(
    run_base: Callable[[npt.NDArray[np.float32]], list[Any]],
    run_cand: Callable[[npt.NDArray[np.float32]], list[Any]],
    inputs: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    first_s: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
) -> ConfirmedLatency:
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
        line = min(percentile(first_s[0].tolist(), 95.0), percentile(first_s[1].tolist(), 95.0))
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
    return ConfirmedLatency(judged[0], judged[1], len(rows))


def packed_run(backend: Backend) -> Callable[[npt.NDArray[np.float32]], list[Any]]:
    """A multi-output detector's run (SSD: boxes, classes, scores, count) with every output
    of the row flattened into one float32 row, so the pass keeps them all in one array;
    detection_metrics() splits them again."""
    run = backend.run

    def packed(x: npt.NDArray[np.float32]) -> list[Any]:
        parts = [np.asarray(o, dtype=np.float32).reshape(1, -1) for o in run(x)]
        return [np.concatenate(parts, axis=1)]

    return packed


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


def detect_precision(model: GateModel, backend: Backend | None) -> str:
    if backend is not None:
        specs = (*backend.inputs, *backend.outputs)
        if any(s.quantization is not None or s.dtype in ("int8", "uint8") for s in specs):
            return "int8"
        if model.precision == "unknown" and backend.name == "litert":
            return "fp32"
    return model.precision


def latency_summaries_ms(
    *latencies_s: npt.NDArray[np.float64],
) -> list[dict[str, float]]:
    """P50/P95/P99/mean in ms of each model's per-row latencies (np.percentile's method);
    equal-length series are sorted together in one numpy call, which is why this is not
    agent.pipeline.latency.latency_summary_ms per series (the percentile itself is its)."""
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
        p50, p95, p99 = (sorted_percentile(ordered, q) for q in PERCENTILES)
        out.append({"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": mean})
    return out
