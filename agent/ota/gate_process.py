"""The OTA gate in a child process: a wall-clock timeout, a memory limit, the report as JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ModelConfig
from agent.errors import EdgeAgentError, ModelError, OTAError
from agent.ota.gate_policy import GatePolicy, apply_package_gate, load_policy
from agent.ota.killpoint import KILL_AT_ENV, KILL_TRACE_ENV
from agent.runtime.base import Backend
from agent.textio import write_atomic

# Test hook: the gate child runs with EDGE_AGENT_KILL_AT set to this variable's value (the
# daemon's own EDGE_AGENT_KILL_AT and EDGE_AGENT_KILL_TRACE never reach the child), so a
# test can make a candidate crash inside the gate (``model.load:digits-1.1.0``) without
# the same point killing the daemon's own loads.
GATE_KILL_AT_ENV = "EDGE_AGENT_GATE_KILL_AT"
# exit statuses of the child besides 0 (report written)
EXIT_GATE_ERROR = 2  # the gate could not run (a model that does not load, a bad golden set)
EXIT_OUT_OF_MEMORY = 4  # an allocation failed under the memory limit
# how often the parent looks at the child, the deadline and the stop event
POLL_S = 0.1
STDERR_TAIL_BYTES = 2000
# the request, report and stderr files of one gate: gate-<pid of the agent>-<ns>.<ext>
GATE_FILE_PREFIX = "gate-"
# the pid of the agent that started the child, so the child sees whether it is orphaned
PARENT_PID_ENV = "EDGE_AGENT_GATE_PARENT_PID"
# prctl(2): the signal this process gets when the thread that started it ends
PR_SET_PDEATHSIG = 1
# a return code no process can have: the parent killed the child on its deadline
TIMED_OUT = -1000
# what onnxruntime and the C++ runtime say when an allocation fails
_ALLOC_FAILURES = (
    "bad_alloc",
    "bad allocation",
    "failed to allocate",
    "memoryerror",
    "cannot allocate memory",
    # the dynamic loader when a shared library no longer fits under the limit
    "failed to map segment",
    # onnxruntime's arena allocator: its messages are cut short before "Failed to
    # allocate" by the runtime's error wrapping, but only allocations fail in there
    "bfc_arena",
)


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    report: Mapping[str, Any]
    reason: str = ""
    # the report's readable table (GateReport.format_table), for the CLI; "" without one
    table: str = ""


@dataclass(frozen=True)
class GateLimits:
    """The child's wall-clock budget and address-space limit (policy.yaml, tightened only)."""

    timeout_s: float
    memory_max_mb: float

    @classmethod
    def from_policy(
        cls,
        golden_dir: Path,
        package_gate: Mapping[str, Any] | None,
        policy_path: Path | None = None,
    ) -> GateLimits:
        path = policy_path or golden_dir / "policy.yaml"
        policy = load_policy(path) if policy_path or path.is_file() else GatePolicy()
        effective, _changes = apply_package_gate(policy, package_gate)
        return cls(effective.gate_timeout_s, effective.gate_memory_max_mb)


@dataclass(frozen=True)
class GateRequest:
    """What the child needs: both models, the golden set, the cache and config.model."""

    baseline: Path
    candidate: Path
    manifest: Mapping[str, Any]
    golden_dir: Path
    baseline_cache: Path | None
    model: ModelConfig
    memory_max_mb: float
    # `edge-agent gate --policy FILE` (None: golden_dir/policy.yaml) and --package-gate
    # (None: the manifest's `gate`, else the candidate package's own)
    policy: Path | None = None
    package_gate: Mapping[str, Any] | None = None
    # where the child writes how far its pass is (0..1), for the CLI's progress line
    progress_path: Path | None = None

    def to_json(self) -> bytes:
        m = self.model
        data = {
            "baseline": str(self.baseline),
            "candidate": str(self.candidate),
            "manifest": dict(self.manifest),
            "golden_dir": str(self.golden_dir),
            "baseline_cache": str(self.baseline_cache) if self.baseline_cache else None,
            "model": {
                "backend": m.backend,
                "providers": list(m.providers),
                "intra_op_threads": m.intra_op_threads,
                "warmup_runs": m.warmup_runs,
                "engine_cache_dir": str(m.engine_cache_dir) if m.engine_cache_dir else None,
            },
            "memory_max_mb": self.memory_max_mb,
            "policy": str(self.policy) if self.policy else None,
            "package_gate": dict(self.package_gate) if self.package_gate is not None else None,
            "progress_path": str(self.progress_path) if self.progress_path else None,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> GateRequest:
        data = json.loads(raw)
        m = data["model"]
        cache = m.get("engine_cache_dir")
        model = ModelConfig(
            backend=m["backend"],
            providers=tuple(m["providers"]),
            intra_op_threads=int(m["intra_op_threads"]),
            warmup_runs=int(m["warmup_runs"]),
            engine_cache_dir=Path(cache) if cache else None,
        )
        return cls(
            baseline=Path(data["baseline"]),
            candidate=Path(data["candidate"]),
            manifest=data["manifest"],
            golden_dir=Path(data["golden_dir"]),
            baseline_cache=Path(data["baseline_cache"]) if data["baseline_cache"] else None,
            model=model,
            memory_max_mb=float(data["memory_max_mb"]),
            policy=Path(data["policy"]) if data.get("policy") else None,
            package_gate=data.get("package_gate"),
            progress_path=Path(data["progress_path"]) if data.get("progress_path") else None,
        )


class GateStopped(OTAError):
    """The agent is stopping: the gate child was killed and the install abandoned."""


# ---------------------------------------------------------------------- the parent side


def run_gate_child(
    request: GateRequest,
    work_dir: Path,
    timeout_s: float,
    stop: threading.Event | None = None,
    progress: Callable[[float], None] | None = None,
) -> GateOutcome:
    """Run the gate in ``python -m agent.ota.gate_process`` and wait for its JSON report.

    A fresh interpreter (fork + exec), never a fork of this process: the daemon holds
    onnxruntime's threads, which a forked child would inherit locked. A child that outlives
    ``timeout_s``, dies of a signal or runs out of memory is a failed gate (the candidate is
    refused); ``stop`` being set kills the child and raises GateStopped. ``progress`` is
    called with the child's progress (0..1) while it runs.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{GATE_FILE_PREFIX}{os.getpid()}-{time.time_ns()}"
    req_path, out_path, err_path, progress_path = (
        work_dir / f"{tag}.{ext}" for ext in ("req", "json", "err", "progress")
    )
    if progress is not None:
        request = dataclasses.replace(request, progress_path=progress_path)
    write_atomic(req_path, request.to_json())
    try:
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.ota.gate_process", str(req_path), str(out_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_child_env(),
                # its own session: a Ctrl-C meant for the CLI does not reach it directly,
                # and the parent's finally below kills it either way
                start_new_session=True,
            )
            try:
                rc = _wait(proc, timeout_s, stop, progress, progress_path)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return _outcome(rc, timeout_s, request.memory_max_mb, out_path, err_path)
    finally:
        for path in (req_path, out_path, err_path, progress_path):
            path.unlink(missing_ok=True)


def remove_stale_gate_files(work_dir: Path) -> None:
    """Delete the gate files an earlier agent process left (it was killed mid-gate, so its
    ``finally`` never ran); this process's own gate, which may be running, is kept."""
    own = f"{GATE_FILE_PREFIX}{os.getpid()}-"
    try:
        entries = list(work_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(GATE_FILE_PREFIX) and not entry.name.startswith(own):
            with contextlib.suppress(OSError):
                entry.unlink()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    env.pop(KILL_TRACE_ENV, None)
    gate_kill = env.pop(GATE_KILL_AT_ENV, None)
    if gate_kill:
        env[KILL_AT_ENV] = gate_kill
    env[PARENT_PID_ENV] = str(os.getpid())
    # the child must import this same agent, wherever it was loaded from
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _wait(
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    stop: threading.Event | None,
    progress: Callable[[float], None] | None = None,
    progress_path: Path | None = None,
) -> int:
    """The child's return code, or TIMED_OUT once ``timeout_s`` has passed (the caller kills it)."""
    deadline = time.monotonic() + timeout_s
    shown = -1.0
    while True:
        if progress is not None and progress_path is not None:
            done = _read_progress(progress_path)
            if done is not None and done != shown:
                shown = done
                progress(done)
        rc = proc.poll()
        if rc is not None:
            if progress is not None and progress_path is not None:
                done = _read_progress(progress_path)  # the last step, written as it ended
                if done is not None and done != shown:
                    progress(done)
            return rc
        if stop is not None and stop.is_set():
            raise GateStopped("gate interrupted: the agent is stopping")
        if time.monotonic() >= deadline:
            return TIMED_OUT
        if stop is not None:
            stop.wait(POLL_S)
        else:
            time.sleep(POLL_S)


def _read_progress(path: Path) -> float | None:
    try:
        value = float(path.read_bytes()[:32])
    except (OSError, ValueError):
        return None  # not written yet, or caught mid-write: the next poll reads it
    return min(1.0, max(0.0, value))


def _outcome(
    rc: int, timeout_s: float, memory_max_mb: float, out_path: Path, err_path: Path
) -> GateOutcome:
    tail = _tail(err_path)
    if rc == TIMED_OUT:
        return _failed(f"gate timed out after {timeout_s:g} s", tail)
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return _failed(f"gate process killed by {name}", tail)
    data = _read_result(out_path)
    if rc == EXIT_OUT_OF_MEMORY:
        return _failed(f"gate process ran out of memory (limit {memory_max_mb:g} MB)", tail)
    if rc == EXIT_GATE_ERROR and data is not None and "error" in data:
        # the candidate could not even be run (e.g. it does not load): the caller refuses
        # it as "gate could not run", as it did when the gate ran in-process
        raise ModelError(str(data["error"]))
    if rc != 0 or data is None or "passed" not in data:
        return _failed(f"gate process failed (exit status {rc})", tail)
    return GateOutcome(
        passed=bool(data["passed"]),
        report=data.get("report") or {},
        reason=str(data["reason"]),
        table=str(data.get("table") or ""),
    )


def _failed(reason: str, stderr_tail: str) -> GateOutcome:
    report: dict[str, Any] = {"passed": False, "failed": ["gate process"], "error": reason}
    if stderr_tail:
        report["stderr_tail"] = stderr_tail
    return GateOutcome(False, report, reason)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - STDERR_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------- the child side


def run_gate_loaded(
    baseline: Path,
    candidate: Path,
    manifest: Mapping[str, Any],
    golden_dir: Path,
    baseline_cache: Path | None,
    load_model: Callable[[Path], Backend],
    policy: Path | None = None,
    package_gate: Mapping[str, Any] | None = None,
    progress: Callable[[float], None] | None = None,
) -> Any:
    """run_gate on backends loaded by ``load_model`` (the model seam); returns the GateReport.

    Both models load the way the daemon will run them (config.model's threads, providers,
    engine cache), so the gate times the candidate as it will run; the RSS its load and
    warm-up add still counts toward the memory check.
    """
    from agent.ota import golden
    from agent.ota.gate_measure import WARMUP_RUNS, current_rss_bytes

    rss_before = current_rss_bytes()
    cand_backend = load_model(candidate)
    try:
        # run_gate warms what it loads itself; here the warm-up's RSS must count too
        cand_backend.warmup(WARMUP_RUNS)
        load_rss_bytes = max(0, current_rss_bytes() - rss_before)
        base_backend = load_model(baseline)
        try:
            report = golden.run_gate(
                base_backend,
                cand_backend,
                golden_dir,
                policy=policy,
                package_gate=package_gate if package_gate is not None else manifest.get("gate"),
                baseline_cache=baseline_cache,
                progress=progress,
            )
            options = {
                "baseline": _options_of(base_backend),
                "candidate": _options_of(cand_backend),
            }
        finally:
            base_backend.close()
    finally:
        cand_backend.close()
    return _with_load_rss(report, load_rss_bytes, baseline, candidate, manifest, options)


def _options_of(backend: Backend) -> dict[str, Any]:
    info = backend.describe()
    return {k: info[k] for k in ("intra_op_threads", "providers") if k in info}


def _with_load_rss(
    report: Any,
    load_rss_bytes: int,
    baseline: Path,
    candidate: Path,
    manifest: Mapping[str, Any],
    options: Mapping[str, Mapping[str, Any]],
) -> Any:
    """The report with the candidate's load RSS added to its memory check (run_gate only
    sees what a backend handed to it adds while it runs), the models' package labels and
    the backend options they ran with."""
    from agent.ota.gate_measure import MB
    from agent.pipeline.model import read_manifest

    added_mb = load_rss_bytes / MB
    checks = []
    for check in report.checks:
        if check.name == "memory" and check.value is not None:
            value = float(check.value) + added_mb
            verdict = check.verdict
            if check.threshold is not None and verdict != "skip":
                verdict = "pass" if value <= float(check.threshold) else "fail"
            check = dataclasses.replace(
                check,
                value=value,
                verdict=verdict,
                detail=f"candidate added {value:.1f} MB RSS",
            )
        checks.append(check)
    report.checks = checks
    report.passed = not any(c.failed for c in checks)
    memory = report.metrics.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("candidate_rss_added_mb"), float):
        memory["candidate_rss_added_mb"] += added_mb
    for role, source, package in (
        ("baseline", baseline, None),
        ("candidate", candidate, manifest),
    ):
        entry = report.models.get(role)
        if not isinstance(entry, dict):
            continue
        entry["options"] = dict(options.get(role) or {})
        if source.is_dir():
            data: Mapping[str, Any] | None = package
            if data is None:
                with contextlib.suppress(EdgeAgentError):
                    data = read_manifest(source)
            if data is not None:
                entry["label"] = f"{data.get('name', '?')}-{data.get('version', '?')}"
    return report


def run_gate_here(request: GateRequest) -> GateOutcome:
    """The gate itself, in this process (what the child runs; tools and the kill-point
    tests may inject it as OTAService's ``gate`` to skip the process start)."""
    from agent.pipeline.model import load_source_backend

    config = AgentConfig(model=request.model)
    report = run_gate_loaded(
        request.baseline,
        request.candidate,
        request.manifest,
        request.golden_dir,
        request.baseline_cache,
        lambda source: load_source_backend(config, source),
        policy=request.policy,
        package_gate=request.package_gate,
        progress=_progress_writer(request.progress_path) if request.progress_path else None,
    )
    data = report.to_dict()
    failed = [str(c) for c in data.get("failed", [])]
    reason = "gate passed" if report.passed else f"gate failed: {', '.join(failed) or 'see report'}"
    pipeline = next((c for c in report.checks if c.name == "pipeline" and c.failed), None)
    if pipeline is not None:
        # the candidate cannot process a golden frame: say why, not only which check
        reason += f" ({pipeline.detail})"
    return GateOutcome(
        passed=bool(report.passed), report=data, reason=reason, table=report.format_table()
    )


def _progress_writer(path: Path) -> Callable[[float], None]:
    """A run_gate progress callback that overwrites ``path`` with the fraction done (the
    parent polls it; a torn read is skipped, so no rename is needed)."""

    def write(done: float) -> None:
        with contextlib.suppress(OSError):
            path.write_bytes(f"{done:.4f}".encode())

    return write


def _exit_with_parent() -> None:
    """End this child when the process that started it is gone (a daemon SIGKILLed or a
    CLI killed mid-gate must not leave a gate running for ever).

    On Linux the kernel does it (PR_SET_PDEATHSIG): a candidate spinning in native code
    may hold the GIL, so a Python thread alone could not. The thread is the fallback.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # the parent may have died while this interpreter started, before the line above
    parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    if os.getppid() != parent:
        os._exit(EXIT_GATE_ERROR)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(EXIT_GATE_ERROR)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _limit_memory(memory_max_mb: float) -> None:
    """Cap this process's address space; an allocation past it fails instead of the board
    running out of memory (RLIMIT_AS: onnxruntime's arenas are anonymous mappings)."""
    import resource

    limit = int(memory_max_mb * (1 << 20))
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _is_alloc_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or any(word in text for word in _ALLOC_FAILURES)


def child_main(argv: Sequence[str]) -> int:
    """``python -m agent.ota.gate_process REQUEST.json REPORT.json``: run one gate."""
    req_path, out_path = Path(argv[0]), Path(argv[1])
    request = GateRequest.from_json(req_path.read_bytes())
    _limit_memory(request.memory_max_mb)
    _exit_with_parent()
    try:
        outcome = run_gate_here(request)
        result: dict[str, Any] = {
            "passed": outcome.passed,
            "reason": outcome.reason,
            "report": dict(outcome.report),
            "table": outcome.table,
        }
        code = 0
    except BaseException as exc:  # everything goes back to the parent as JSON
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        code = EXIT_OUT_OF_MEMORY if _is_alloc_failure(exc) else EXIT_GATE_ERROR
        if code == EXIT_GATE_ERROR and not isinstance(exc, EdgeAgentError):
            code = 1  # a bug: the parent reports the exit status and stderr's tail
            print(f"gate process: {type(exc).__name__}: {exc}", file=sys.stderr)
        result = {"error": str(exc)}
    try:
        write_atomic(out_path, json.dumps(result, default=str).encode())
    except MemoryError:
        return EXIT_OUT_OF_MEMORY
    return code


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
