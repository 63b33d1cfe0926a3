"""Probation judges fairly: windowed medians against the old model's live latency, on
monotonic time; a latency-only failure is retried, not refused for good."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.ota import install
from agent.ota.probation import Baseline, ProbationPolicy, ProbationWatch, Verdict
from agent.ota.states import OTAState

from .conftest import Device, feed_frames
from .fault_models import heavy_model
from .test_daemon_link import CLI, REPO, cli, daemon_config, status, wait_for

POLICY = ProbationPolicy(min_frames=300, min_s=0.0)


def noisy(median_ms: float, n: int, spike_every: int = 10, spike_ms: float = 40.0) -> list[float]:
    """Latencies in seconds around ``median_ms`` with a scheduler spike every few frames
    (what a loaded 2-core board looks like), reproducible."""
    rng = np.random.default_rng(3)
    out = rng.lognormal(np.log(median_ms), 0.25, n)
    out[::spike_every] = spike_ms
    return [float(x) / 1000.0 for x in out]


@dataclasses.dataclass(frozen=True)
class LatencyRow:
    """What the noise (or the candidate) controls: the new model's per-frame latencies."""

    id: str
    baseline_p50_ms: float | None
    latencies_s: list[float]
    verdict: Verdict
    latency_only: bool = False


ROWS = [
    LatencyRow("same-model-with-spikes", 2.0, noisy(2.0, 300), Verdict.PASSED),
    LatencyRow("same-model-every-4th-frame-a-spike", 2.0, noisy(2.2, 300, 4, 80.0), Verdict.PASSED),
    LatencyRow(
        "one-slow-window-then-normal",
        2.0,
        [0.02] * 50 + noisy(2.0, 250),
        Verdict.PASSED,
    ),
    LatencyRow("three-times-slower", 2.0, noisy(6.0, 300), Verdict.FAILED, latency_only=True),
    LatencyRow("no-baseline-no-latency-check", None, noisy(30.0, 300), Verdict.PASSED),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_latency_verdicts_rest_on_windowed_medians(row: LatencyRow) -> None:
    base = Baseline(latency_p50_ms=row.baseline_p50_ms, latency_source="live")
    watch = ProbationWatch(POLICY, base, started_s=0.0)
    result = None
    for latency_s in row.latencies_s:
        watch.observe(latency_s, 0.9)
        result = watch.judge(1.0)
        if result.verdict is not Verdict.PENDING:
            break
    assert result is not None
    assert (result.verdict, result.latency_only) == (row.verdict, row.latency_only), result
    if row.latency_only:
        # it took the whole streak of windows, not one noisy frame
        assert result.frames == POLICY.latency_window_frames * POLICY.latency_breach_windows
        assert "in 3 windows of 50 frames in a row" in result.reason


def test_the_live_baseline_needs_enough_old_model_frames() -> None:
    from agent.ota.host import LiveLatency

    gate = Baseline(latency_p50_ms=0.05, latency_source="gate")
    few = gate.with_live(LiveLatency(3.0, 5.0, 10), min_samples=50)
    assert few == gate
    enough = gate.with_live(LiveLatency(3.0, 5.0, 400), min_samples=50)
    assert (enough.latency_p50_ms, enough.latency_source, enough.latency_samples) == (
        3.0,
        "live",
        400,
    )
    assert Baseline.from_gate_report({"probation_baseline": enough.to_dict()}) == enough


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("jump_s", [365 * 86400.0, -365 * 86400.0], ids=["ahead", "back"])
def test_probation_runs_on_monotonic_time_through_a_wall_clock_jump(
    device: Device, jump_s: float
) -> None:
    wall, mono = Clock(1.8e9), Clock(1000.0)
    policy = ProbationPolicy(min_frames=20, min_s=60.0)
    svc = device.service(system_clock=wall, monotonic_clock=mono, probation_policy=policy)
    svc.install_file(device.package("1.0.0", 1))
    wall.now += jump_s  # a year either way: neither ends nor freezes probation
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.PROBATION
    mono.now += 61.0
    feed_frames(svc, 1)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


def test_a_latency_only_failure_is_retried_before_it_is_refused(device: Device) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    policy = ProbationPolicy(
        min_frames=30, min_s=0.0, latency_window_frames=10, latency_breach_windows=3
    )
    svc.probation_policy = policy
    candidate = device.package("1.1.0", 2, "digits_int8.onnx", precision="int8")
    for attempt in range(1, policy.latency_failures_max + 1):
        svc.install_file(candidate)
        for _ in range(30):  # 50 ms a frame: far over the old model's gate latency
            svc.observe_frame(0.050, 0.9)
        last = svc.journal.last()
        assert last is not None and last.state is OTAState.ROLLED_BACK, last
        assert "latency median" in last.reason
        refused = svc.journal.refusal("digits", "1.1.0", "local")
        if attempt < policy.latency_failures_max:
            assert refused is None, f"attempt {attempt} was refused for good"
        else:
            assert refused is not None and "latency" in refused
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    svc.close()


class ContendedHost:
    """A ModelHost whose old model reads 2 ms a frame, and 6 ms while a gate child shares
    its cores (what the loaded CI machine showed): the gate must not set the bar."""

    def __init__(self, config: Any) -> None:
        from agent.ota.host import LiveLatency

        self.config = config
        self.gating = False
        self.swapped: list[Any] = []
        self._calm, self._busy = LiveLatency(2.0, 3.0, 400), LiveLatency(6.0, 9.0, 400)

    def live_latency(self) -> Any:
        return self._busy if self.gating else self._calm

    def swap_in(self, model: Any) -> None:
        self.swapped.append(model)

    def recent_frame(self) -> Any:
        return None


def test_the_live_baseline_is_read_before_the_gate_competes_for_the_cores(
    device: Device,
) -> None:
    from .conftest import in_process_gate

    host = ContendedHost(device.config)
    real_gate = in_process_gate(device)

    def contended_gate(baseline: Path, candidate: Path, manifest: Any) -> Any:
        host.gating = True  # the old model's frames slow down from here on ...
        return real_gate(baseline, candidate, manifest)  # ... and stay slow (warm-up too)

    svc = device.service(host=host, gate=contended_gate)
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    host.gating = False
    svc.install_file(device.package("1.1.0", 2))
    assert host.gating, "the gate ran"
    entry = svc.journal.last()
    assert entry is not None and entry.state is OTAState.PROBATION
    base = Baseline.from_gate_report(entry.detail)
    assert (base.latency_source, base.latency_p50_ms) == ("live", 2.0), base
    svc.close()


# ------------------------------------------------------------------ a loaded machine, for real

# 1024 wide: at 512, 3x the layers measured only 2-3x the time on this CPU (fixed per-run
# cost), too close to the 1.5x + 1 ms limit to be a clear "3x slower" model
BASE_LAYERS = 40
BASE_WIDTH = 1024


@pytest.fixture
def busy_cores() -> Iterator[None]:
    """A busy loop on each core for the whole test: the machine is loaded as in the field."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def probation_rows(device: Device) -> str:
    """The journal's probation outcomes, newest first, for a failure message (a string:
    pytest -q shortens a long repr, and the reason is what a failure needs)."""
    from agent.ota.journal import Journal

    journal = Journal(device.state_dir / "state.db")
    try:
        ends = (OTAState.COMMITTED, OTAState.ROLLED_BACK, OTAState.REJECTED)
        lines = [
            f"{e.version} {e.state.value}: {e.reason}"
            for e in journal.history(12)
            if e.state in ends
        ]
        return "\n".join(lines)
    finally:
        journal.close()


def run_probation(config: Path, package: Path) -> dict[str, Any]:
    result = cli("install", package, "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    return wait_for(
        lambda: (s := status(config))["ota"]["state"] != "PROBATION" and s,
        timeout_s=180,
        what="the end of probation",
    )


# three gates and two probations of a heavy model with both cores busy: minutes, not seconds
@pytest.mark.timeout(900)
def test_on_a_loaded_machine_the_same_model_passes_and_a_3x_slower_one_is_rolled_back(
    device: Device, busy_cores: None
) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1, heavy_model(BASE_LAYERS, BASE_WIDTH)))
    feed_frames(svc, 20)
    svc.close()
    config = daemon_config(device, device.root / "ctl.sock")
    text = config.read_text().replace("probation_frames: 20", "probation_frames: 200")
    config.write_text(text)
    proc = subprocess.Popen(
        [*CLI, "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # enough frames of the old model for a live baseline
        wait_for(lambda: status(config).get("frames", 0) > 120, timeout_s=120, what="frames")
        same = device.package("1.1.0", 2, heavy_model(BASE_LAYERS, BASE_WIDTH))
        after = run_probation(config, same)
        assert after["ota"]["state"] == "COMMITTED", probation_rows(device)
        wait_for(lambda: status(config).get("frames", 0) > int(after["frames"]) + 120)
        slow = device.package("1.2.0", 3, heavy_model(3 * BASE_LAYERS, BASE_WIDTH))
        after = run_probation(config, slow)
        ota = after["ota"]
        assert ota["state"] == "ROLLED_BACK", probation_rows(device)
        # the status file is rewritten once a tick: it may still name 1.2.0 just after
        wait_for(lambda: status(config)["model"]["version"] == "1.1.0", what="1.1.0 live again")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    svc = device.service()
    last = svc.journal.last()
    assert last is not None and "latency median" in last.reason, last
    assert "live" in last.reason  # judged against the old model in the same loop
    assert svc.journal.refusal("digits", "1.2.0", "local") is None  # may be retried
    svc.close()
