"""Fleet quality benchmark: a quietly bad release rolled out to >= 200 devices, each an OTAService.

The fleet: `edge-agent serve` (real TUF repository, OTLP ingest into a SQLite fleet store,
rollout controller every 0.5 s) on 127.0.0.1, and --devices simulated devices. Each device
is its own state dir with a real OTAService: the TUF channel client over HTTP, rollout
membership, download, signature and hash checks, the golden-set gate, activation into a
ModelSlot, probation on live frames, the shadow evaluation and the journal. Each reports
its ota.state events through a real TelemetryRecorder (its own telemetry.db) drained by
the real OTLP exporter to the server. Frames come from the field: a pool of
--field-frames (4096) synthetic digits with the field's look (`contrast`, default 0.5: a
washed-out camera), shared by the devices, each drawing its own random sequence from it
(the synthetic source's own 64-frame loop, with the shadow taking every second or third
frame, shows a device the same 21-32 frames over and over: in a run with it, one device
measured the good INT8 twin at agreement 0.88, though every device's 64 frames agree on
at least 60, and rolled the good release back). Each frame runs
through the live model the way the daemon runs a frame (the package's preprocessing, the
backend, top-1 post-processing); its latency and confidence go to probation
(observe_frame).

The shadow is the device's own: each device's ModelHost is a FeedingHost (a SlotHost whose
set_shadow keeps the feed and returns True, as the daemon's does), and after each served
frame the bench's frame loop calls that feed as Daemon.loop does after a served batch,
`feed(model, frames, outputs, latency_s, fps_cap)`. So the device's ShadowRun
(agent/ota/shadow_run.py) runs the previous model on its worker thread beside the new one
on the same live frames, probation waits for its verdict, and a failed shadow check rolls
the device back in probation with the figures in the reason; the fleet judges only the
quality figures the devices report. The bench prints, per release, how many devices
rolled back on the shadow, on other reasons, and committed it.

The bench's device policy is golden_local/policy.yaml with these changes, for what one
process of 200 devices on shared cores cannot measure and for the sample size (the quality
thresholds are the shipped ones):
- gate `latency_p95_slack_ms: 1000` (as in tests/ota: the latency check is noise here);
- shadow `sample_rate: 1.0`: every served frame is offered, so a probation gets its
  `min_frames` compared frames within one device step (at 0.25 it needs 4x the frames
  and, since a busy worker drops what it cannot take, often a second step a round later,
  and `wait_max_s: 120` is then close: a probation that runs out of it commits unjudged);
- shadow `min_frames: 100` (golden_local: 50): the good INT8 twin agrees with the FP32
  model on 98.2 % of the field's frames; judged on 50 frames against `agreement_min: 0.9`
  a device rolls it back by chance with p ~ 5e-4 (about one run in ten of 200 devices),
  on 100 frames with p ~ 1e-5 (the quietly bad one agrees on 0 % either way);
- shadow `cpu_budget_pct: 100`: the budget is the worker's wall-clock busy time against
  the run's age, and here that busy time is mostly waiting for the GIL and the cores the
  other devices use, so 25 % would drop most samples without saving anything;
- shadow `latency_slack_ms: 1000`: the two models' latencies are timed on different
  threads of one loaded process (the served one in the frame loop, the shadow one on the
  niced worker), noise that would roll back the good control release.
The frames come back to back (no camera period), so the feed gets `fps_cap` 0 (uncapped):
the FPS cap's idle-time rule does not apply. A device step serves frames until its
probation ends (at most --max-probation-frames): the worker takes about one frame in four
(it drops what comes while it is busy), so a probation ends within one step, well inside
`wait_max_s` (a probation that spanned two steps would wait a whole round between them).

Shared to keep it to minutes: one loaded model session per package version (every device
runs the same bytes; a device's close() leaves it open), and the gate's verdict per
(current, candidate) pair: the first device of a pair runs the real gate in its child
process on the bench's golden copy, the others reuse that outcome. At the end every
device's OTAService is closed and the bench prints how many shadow worker threads are
still alive (0 expected).

Releases: 1.0.0 (the demo FP32 digits model) goes to every device first (one 100 % stage).
Then, each staged 1 -> 10 -> 100 % under the same channel policy with a quality section:
1.1.0, the INT8 twin (a good release, the control: it must complete; --no-control skips
it), and 1.2.0, that INT8 model made quietly bad by tools/build_quiet_bad_release.py. The
last line is `fleet_quiet_bad_release_max_pct=<p>`: the largest share of the fleet that
ever ran 1.2.0 as COMMITTED (measured after every device step).

    .venv/bin/python benchmarks/bench_fleet_quality.py --devices 200
    .venv/bin/python benchmarks/bench_fleet_quality.py --devices 200 --keep /tmp/fleetq
    edge-agent rollout status --channel stable --repo /tmp/fleetq/repo --db /tmp/fleetq/fleet.db
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from build_quiet_bad_release import quiet_bad_model  # noqa: E402

from agent.config import AgentConfig, OTAConfig, SourceConfig, TelemetryConfig  # noqa: E402
from agent.errors import EdgeAgentError  # noqa: E402
from agent.fleet.keys import generate_key_files, load_key_dir  # noqa: E402
from agent.fleet.repo import init_repo, publish_package  # noqa: E402
from agent.fleet.rollout import (  # noqa: E402
    QualityPolicy,
    RolloutPolicy,
    is_member,
    load_state,
    start_rollout,
)
from agent.fleet.tokens import add_device_token, add_operator_token  # noqa: E402
from agent.ota.gate_process import GateLimits, GateOutcome, GateRequest, run_gate_child  # noqa: E402
from agent.ota.host import ShadowFeed, SlotHost  # noqa: E402
from agent.ota.journal import OTAState  # noqa: E402
from agent.ota.service import OTAService  # noqa: E402
from agent.package import build_keyring, load_public_key_file, write_keyring  # noqa: E402
from agent.package.build import build_package, sign_package  # noqa: E402
from agent.package.keys import load_signing_key  # noqa: E402
from agent.pipeline.model import load_package_backend, package_model_file  # noqa: E402
from agent.pipeline.postprocess import top_k_rows  # noqa: E402
from agent.pipeline.preprocess import Preprocessor  # noqa: E402
from agent.pipeline.slot import ActiveModel, ModelSlot  # noqa: E402
from agent.pipeline.sources import Frame, SyntheticSource  # noqa: E402
from agent.runtime.base import Backend  # noqa: E402
from agent.telemetry.recorder import TelemetryRecorder  # noqa: E402
from agent.telemetry.store import TelemetryStore  # noqa: E402
from agent.telemetry.uploader import drain, exporter_from_config  # noqa: E402

DEMO = REPO_ROOT / "agent" / "demo" / "models"
GOLDEN = REPO_ROOT / "golden_local"
# uint8 frames -> [0, 1], the digits model's domain (golden_local holds pixel/16 of 0..16)
SCHEMA = """\
name: digits
task: classification
runtime: {{kind: onnx, precision: {precision}}}
preprocess: {{resize: [8, 8], layout: NCHW, color_order: GRAY, scale: 0.00392156862745098}}
labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
"""
CHANNEL = "stable"
QUALITY = QualityPolicy(
    shadow_agreement_min=0.9,
    confidence_delta_min=-0.1,
    class_hist_distance_max=0.2,
    error_rate_max=0.02,
    min_devices=2,
    max_breaching_pct=50.0,
)
CONTROLLER_INTERVAL_S = 0.5
# golden_local/policy.yaml's gate and shadow sections, changed for this bench (the module
# docstring says why); every quality threshold stays the shipped one
GATE_POLICY = {"latency_p95_slack_ms": 1000.0}
SHADOW_POLICY = {
    "sample_rate": 1.0,
    "cpu_budget_pct": 100.0,
    "latency_slack_ms": 1000.0,
    "min_frames": 100,
}
BAD = "1.2.0"


class SharedBackend:
    """One loaded model used by every device that runs this version; a device's close()
    (after a swap or a rollback) leaves it open for the others."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class Fleet:
    """What every device shares: loaded models and gate verdicts, and the run's counters."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.backends: dict[str, SharedBackend] = {}
        self.gates: dict[tuple[str, str], GateOutcome] = {}
        self.gate_runs = 0
        self.committed_bad: set[str] = set()
        self.max_committed_bad = 0
        self.committed_bad_log: list[str] = []
        self.started_s = time.monotonic()
        self.errors: list[str] = []

    def load(self, package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
        digest = hashlib.sha256(package_model_file(package_dir, manifest).read_bytes()).hexdigest()
        with self.lock:
            if digest not in self.backends:
                self.backends[digest] = SharedBackend(
                    load_package_backend(self.config, package_dir, manifest)
                )
            return self.backends[digest]  # type: ignore[return-value]  # a Backend proxy

    def gate_for(self, service: OTAService) -> Any:
        """The device's gate: the real one in its child process, once per model pair."""

        def gate(baseline: Path, candidate: Path, manifest: Mapping[str, Any]) -> GateOutcome:
            def digest(path: Path) -> str:
                model = path / "model.onnx" if path.is_dir() else path
                return hashlib.sha256(model.read_bytes()).hexdigest()

            pair = (digest(baseline), digest(candidate))
            with self.lock:
                if pair not in self.gates:
                    golden = service.config.ota.golden_dir
                    assert golden is not None
                    limits = GateLimits.from_policy(golden, manifest.get("gate"))
                    request = GateRequest(
                        baseline=baseline,
                        candidate=candidate,
                        manifest=manifest,
                        golden_dir=golden,
                        baseline_cache=service.state_dir / "gate-cache",
                        model=service.config.model,
                        memory_max_mb=limits.memory_max_mb,
                    )
                    outcome = run_gate_child(
                        request, service.staging_dir, limits.timeout_s, service.stopping
                    )
                    self.gates[pair] = outcome
                    self.gate_runs += 1
                    print(
                        f"gate {manifest.get('version')}: "
                        f"{'PASS' if outcome.passed else 'FAIL'} ({outcome.reason})",
                        flush=True,
                    )
                return self.gates[pair]

        return gate


@dataclass
class FeedingHost(SlotHost):
    """A SlotHost whose frame loop (the bench's, run_probation) feeds the OTA shadow: it
    keeps the feed set_shadow gives it, as the daemon does, so the device's own ShadowRun
    runs; SlotHost's own set_shadow says it has no frame loop."""

    feed: ShadowFeed | None = None

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        self.feed = feed
        return True


class FieldSource:
    """A device's camera: random draws from the field's frame pool, shared by every device
    (the pool: synthetic digits with the field's look; see the module docstring)."""

    def __init__(self, pool: Sequence[Frame], seed: int) -> None:
        self.pool = pool
        self.rng = np.random.default_rng(seed)

    def read(self, timeout_s: float) -> Frame:
        return self.pool[int(self.rng.integers(len(self.pool)))]


def field_pool(contrast: float, size: int) -> list[Frame]:
    """``size`` distinct synthetic digit frames with the field's look."""
    source = SyntheticSource((8, 8), "digits", seed=0, contrast=contrast, pool=size)
    frames = [source.read(0.0) for _ in range(size)]
    return [f for f in frames if f is not None]


@dataclass
class Device:
    device_id: str
    service: OTAService
    host: FeedingHost
    recorder: TelemetryRecorder
    source: FieldSource
    upload_store: TelemetryStore
    telemetry: TelemetryConfig
    exporter: Any
    preprocessors: dict[int, Preprocessor] = field(default_factory=dict)
    probation_frames: int = 0
    # served batches handed to the shadow feed, and how many it took
    shadow_offered: int = 0
    shadow_taken: int = 0

    def run_frame(self, model: ActiveModel, frame: Any) -> tuple[Any, float, float]:
        """One frame through ``model`` as the daemon runs it: (outputs, confidence, latency_s)."""
        pre = self.preprocessors.get(id(model))
        if pre is None:
            pre = self.preprocessors[id(model)] = Preprocessor(
                model.preprocess, model.backend.inputs[0]
            )
        x = pre.batch([frame])
        started = time.perf_counter()
        outputs = model.backend.run(x)
        latency_s = time.perf_counter() - started
        best = top_k_rows(outputs[0], 1, model.labels)[0][0]
        return outputs, float(best["score"]), latency_s


def run_probation(device: Device, max_frames: int) -> None:
    """Live field frames through the live model until probation commits or rolls back,
    each served frame then offered to the device's shadow feed as Daemon.loop does."""
    service = device.service
    for _ in range(max_frames):
        last = service.journal.last()
        if last is None or last.state is not OTAState.PROBATION:
            return
        frame = device.source.read(0.0)
        assert frame is not None
        model = device.host.slot.current()
        try:
            outputs, confidence, latency_s = device.run_frame(model, frame)
        except EdgeAgentError:
            service.observe_frame(0.0, None, error=True)
            continue
        device.probation_frames += 1
        service.observe_frame(latency_s, confidence)
        # read after observe_frame, as the daemon does: a verdict there stops the shadow
        feed = device.host.feed
        if feed is not None:
            device.shadow_offered += 1
            # frames come back to back here (no camera period): fps_cap 0, uncapped
            device.shadow_taken += int(feed(model, [frame], outputs, latency_s, 0.0))


def step(device: Device, fleet: Fleet, bad_version: str, max_frames: int) -> None:
    """One poll of the device: check the channel, install or roll back, run probation,
    upload its telemetry; then count whether it runs the bad release as COMMITTED."""
    service = device.service
    try:
        with service.step():
            service.update_now()
    except EdgeAgentError as exc:
        with fleet.lock:
            fleet.errors.append(f"{device.device_id}: {exc}")
    run_probation(device, max_frames)
    device.recorder.flush()
    drain(device.upload_store, device.exporter, device.telemetry, max_s=30.0, max_retries=5)
    last = service.journal.last()
    on_bad = (
        service.current_version() == bad_version
        and last is not None
        and last.state is OTAState.COMMITTED
    )
    with fleet.lock:
        if on_bad:
            if device.device_id not in fleet.committed_bad:
                fleet.committed_bad_log.append(
                    f"{device.device_id} committed {bad_version} at "
                    f"{time.monotonic() - fleet.started_s:.1f} s: {last.reason if last else ''}"
                )
            fleet.committed_bad.add(device.device_id)
        else:
            fleet.committed_bad.discard(device.device_id)
        fleet.max_committed_bad = max(fleet.max_committed_bad, len(fleet.committed_bad))


def bench_policy(path: Path) -> None:
    """The bench's device policy: golden_local's with GATE_POLICY and SHADOW_POLICY (the
    module docstring says why each)."""
    import yaml

    policy = yaml.safe_load(path.read_text())
    policy.update(GATE_POLICY)
    policy["shadow"].update(SHADOW_POLICY)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_release(
    work: Path, keys_dir: Path, model: Path, version: str, counter: int, precision: str
) -> Path:
    schema = work / "schema.yaml"
    schema.write_text(SCHEMA.format(precision=precision))
    pkg, _ = build_package(model, schema, work / "dist", version=version, release_counter=counter)
    for name in ("release-1", "release-2"):
        sign_package(pkg, load_signing_key(keys_dir / f"{name}.key"))
    return pkg


def start_server(work: Path, repo: Path, keys_dir: Path, tokens: Path) -> tuple[Any, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "-q",
            "serve",
            "--repo",
            str(repo),
            "--db",
            str(work / "fleet.db"),
            "--tokens",
            str(tokens),
            "--keys",
            str(keys_dir),
            "--port",
            str(port),
            "--controller-interval-s",
            str(CONTROLLER_INTERVAL_S),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "server.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return server, url
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"edge-agent serve did not start (see {work / 'server.log'})")
        time.sleep(0.2)


def make_device(
    i: int,
    work: Path,
    url: str,
    token: str,
    golden: Path,
    keyring: Any,
    fleet: Fleet,
    pool: Sequence[Frame],
    args: Any,
) -> Device:
    device_id = f"dev-{i:04d}"
    state = work / "devices" / device_id
    (state / "keyring").mkdir(parents=True)
    write_keyring(keyring, state / "keyring")
    (state / "tuf").mkdir()
    shutil.copy(work / "repo" / "metadata" / "1.root.json", state / "tuf" / "root.json")
    telemetry = TelemetryConfig(
        db_path=state / "telemetry.db",
        endpoint=url,
        headers={"Authorization": f"Bearer {token}"},
        summary_interval_s=3600.0,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
    )
    config = AgentConfig(
        device_id=device_id,
        state_dir=state,
        source=SourceConfig(kind="synthetic", pattern="digits", seed=i, contrast=args.contrast),
        telemetry=telemetry,
        ota=OTAConfig(
            enabled=True,
            repository_url=url,
            channel=CHANNEL,
            golden_dir=golden,
            probation_frames=args.probation_frames,
            probation_s=0.0,
            reserve_free_bytes=0,
        ),
    )
    recorder = TelemetryRecorder(
        telemetry, device_id, state / "telemetry.db", boot_id="boot-1", start_uploader=False
    )
    slot = ModelSlot()
    host = FeedingHost(slot, config)
    service = OTAService(config, recorder=recorder, slot=slot, host=host, load_model=fleet.load)
    service.gate = fleet.gate_for(service)
    source = FieldSource(pool, seed=i)
    upload_store = TelemetryStore(
        state / "telemetry.db", device_id, "boot-1", check_integrity=False
    )
    return Device(
        device_id,
        service,
        host,
        recorder,
        source,
        upload_store,
        telemetry,
        exporter_from_config(telemetry),
    )


def rollout_phase(
    name: str,
    devices: list[Device],
    fleet: Fleet,
    url: str,
    operator: dict[str, str],
    version: str,
    bad_version: str,
    args: Any,
) -> dict[str, Any]:
    """Poll every device in rounds until the rollout of ``version`` ends (or max rounds)."""
    started = time.monotonic()
    outcome = "timeout"
    max_percent = 0.0
    status: dict[str, Any] = {}
    for rnd in range(args.max_rounds):
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            list(
                pool.map(lambda d: step(d, fleet, bad_version, args.max_probation_frames), devices)
            )
        time.sleep(CONTROLLER_INTERVAL_S * 3)  # let the controller read what was uploaded
        status = requests.get(f"{url}/api/rollouts/{CHANNEL}", headers=operator, timeout=30).json()
        max_percent = max(max_percent, float(status["percent"]))
        running = sum(d.service.current_version() == version for d in devices)
        print(
            f"  {name} round {rnd + 1}: stage {status['stage'] + 1} at {status['percent']:g}% "
            f"next={status['next_decision']} running {version}: {running} "
            f"committed-bad now: {len(fleet.committed_bad)}",
            flush=True,
        )
        if status["aborted"] and not any(d.service.current_version() == version for d in devices):
            outcome = "aborted"
            break
        if status["completed"] and running == len(devices):
            outcome = "complete"
            break
        if status["stage"] == len(status["stages_percent"]) - 1 and not status["completed"]:
            time.sleep(args.soak_s)
    return {
        "outcome": outcome,
        "time_s": time.monotonic() - started,
        "max_percent": max_percent,
        "status": status,
    }


def report_phase(
    version: str, result: dict[str, Any], state: Any, devices: list[Device], expected: str
) -> None:
    """The controller's decisions, the stage's quality figures, who installed the release."""
    for h in state.history:
        extra = (
            f" figure={h['figure']} breaching={h['breaching']}/{h['reporting']}"
            if "figure" in h
            else ""
        )
        print(
            f"  decision {h['action']} at {h['percent']:g}%: "
            f"committed={h.get('committed', '-')} failed={h.get('failed', '-')}{extra} "
            f"({h['reason']})"
        )
    for figure in result["status"].get("quality", []):
        worst = "-" if figure["worst"] is None else f"{figure['worst']:.4g}"
        print(
            f"  quality {figure['figure']}: {figure['breaching']} of {figure['reporting']} "
            f"reporting devices breach (worst {worst})"
        )
    n = len(devices)
    attempted = sum(
        1 for d in devices if any(e.version == version for e in d.service.journal.history(500))
    )
    still = sum(d.service.current_version() == version for d in devices)
    print(
        f"phase {version}: {result['outcome']} (expected {expected}) in "
        f"{result['time_s']:.1f} s, highest stage {result['max_percent']:g}%, devices that "
        f"installed it {attempted} ({100 * attempted / n:.1f}%), running it now {still}",
        flush=True,
    )
    counts = probation_outcomes(version, devices)
    print(
        f"  devices' own verdicts on {version}: rolled back on shadow {counts['shadow']}, "
        f"rolled back on other reasons {counts['other']}, committed {counts['committed']} "
        f"(of them rolled back later {counts['committed_then_rolled_back']}); probation ends "
        f"with the device's shadow figures {counts['with_shadow']} of {counts['ended']}",
        flush=True,
    )
    for reason in counts["other_reasons"][:3]:
        print(f"  other rollback: {reason}")


def probation_outcomes(version: str, devices: list[Device]) -> dict[str, Any]:
    """What each device's own journal says about ``version``: how its probation ended
    (a ROLLED_BACK row names the release it left in ``version``)."""
    counts: dict[str, Any] = dict.fromkeys(
        ("shadow", "other", "committed", "committed_then_rolled_back", "ended", "with_shadow"),
        0,
    )
    counts["other_reasons"] = []
    for d in devices:
        rows = [e for e in d.service.journal.history(500) if e.version == version]
        ends = [e for e in rows if e.state in (OTAState.COMMITTED, OTAState.ROLLED_BACK)]
        counts["ended"] += len(ends)
        counts["with_shadow"] += sum(
            "shadow_agreement" in e.detail.get("quality", {}) for e in ends
        )
        committed = any(e.state is OTAState.COMMITTED for e in rows)
        rolled = [e for e in rows if e.state is OTAState.ROLLED_BACK]
        if committed:
            counts["committed"] += 1
            counts["committed_then_rolled_back"] += bool(rolled)
        elif any("shadow check failed" in e.reason for e in rolled):
            counts["shadow"] += 1
        elif rolled:
            counts["other"] += 1
            counts["other_reasons"].append(f"{d.device_id}: {rolled[-1].reason}")
    return counts


def shadow_threads_left(wait_s: float) -> int:
    """The devices' shadow worker threads still alive after ``wait_s`` (each ends within
    its idle poll once its run is closed)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [t for t in threading.enumerate() if t.name == "ota-shadow" and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--contrast", type=float, default=0.5, help="the field's look")
    parser.add_argument("--field-frames", type=int, default=4096, help="the field's frame pool")
    parser.add_argument("--probation-frames", type=int, default=50)
    parser.add_argument("--max-probation-frames", type=int, default=4000)
    parser.add_argument("--soak-s", type=float, default=2.0, help="soak per stage (real time)")
    parser.add_argument("--max-rounds", type=int, default=12)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="work here and keep it (repo, fleet.db)")
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the good release rolled out under the same policy first",
    )
    args = parser.parse_args()
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            print(f"Error: {args.keep} is not empty (--keep)", file=sys.stderr)
            return 2
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-fleet-quality-"))
    server: Any = None
    devices: list[Device] = []
    closed = False
    started = time.monotonic()
    try:
        keys_dir = work / "keys"
        for role in ("root", "targets", "snapshot", "timestamp", "rollout"):
            generate_key_files(keys_dir, role, role)
        for i in (1, 2):
            generate_key_files(keys_dir, f"release-{i}", "release")
        keys = load_key_dir(keys_dir)
        repo = work / "repo"
        init_repo(repo, keys, release_threshold=2)
        keyring = build_keyring(
            [load_public_key_file(keys_dir / f"release-{i}.pub.json") for i in (1, 2)],
            {"release": 2},
        )
        # 1.0.0 the demo FP32 model; 1.1.0 its INT8 twin (a good release: the control);
        # 1.2.0 the INT8 model made quietly bad (tools/build_quiet_bad_release.py)
        quiet = work / "digits_quiet_bad.onnx"
        quiet.write_bytes(quiet_bad_model((DEMO / "digits_int8.onnx").read_bytes()))
        releases = [
            ("1.0.0", DEMO / "digits_fp32.onnx", "fp32"),
            ("1.1.0", DEMO / "digits_int8.onnx", "int8"),
            ("1.2.0", quiet, "int8"),
        ]
        for counter, (version, model, precision) in enumerate(releases, start=1):
            tar = build_release(work, keys_dir, model, version, counter, precision)
            publish_package(repo, tar, keys)
        golden = work / "golden"
        shutil.copytree(GOLDEN, golden)
        bench_policy(golden / "policy.yaml")
        tokens_path = work / "tokens.json"
        ids = [f"dev-{i:04d}" for i in range(args.devices)]
        tokens = {d: add_device_token(tokens_path, d) for d in ids}
        operator = {"Authorization": f"Bearer {add_operator_token(tokens_path, 'bench')}"}
        server, url = start_server(work, repo, keys_dir, tokens_path)
        fleet = Fleet(AgentConfig())
        pool = field_pool(args.contrast, args.field_frames)
        devices = [
            make_device(i, work, url, tokens[d], golden, keyring, fleet, pool, args)
            for i, d in enumerate(ids)
        ]
        print(f"devices={len(devices)} server={url} field contrast={args.contrast:g}", flush=True)

        # 1.0.0 everywhere: the release the quiet one is compared against
        start_rollout(
            repo,
            CHANNEL,
            "1.0.0",
            keys,
            RolloutPolicy(stages_percent=(100.0,), soak_s=0.0, min_devices=2),
            package="digits",
        )
        base = rollout_phase("1.0.0", devices, fleet, url, operator, "1.0.0", BAD, args)
        print(f"phase 1.0.0: {base['outcome']} in {base['time_s']:.1f} s", flush=True)
        if base["outcome"] != "complete":
            raise RuntimeError("the first release did not reach every device")

        policy = RolloutPolicy(
            stages_percent=(1.0, 10.0, 100.0),
            soak_s=args.soak_s,
            min_devices=2,
            max_failure_rate=0.05,
            quality=QUALITY,
        )
        phases = [("1.1.0", "good (INT8 twin)", "complete")] if args.control else []
        phases.append((BAD, "quietly bad", "aborted"))
        results = {}
        for version, what, expected in phases:
            salt = hashlib.sha256(f"bench-fleet-quality-{version}".encode()).hexdigest()[:32]
            start_rollout(repo, CHANNEL, version, keys, policy, package="digits", salt=salt)
            canaries = sum(1 for d in ids if is_member(d, salt, 1.0))
            print(f"{version} ({what}): {canaries} devices in the 1% stage", flush=True)
            result = rollout_phase(version, devices, fleet, url, operator, version, BAD, args)
            results[version] = result
            report_phase(version, result, load_state(repo, CHANNEL), devices, expected)
        offered = sum(d.shadow_offered for d in devices)
        taken = sum(d.shadow_taken for d in devices)
        print(
            f"shadow feed: {taken} of {offered} served frames taken by the devices' shadow "
            f"runs; gates run {fleet.gate_runs}, step errors {len(fleet.errors)}"
        )
        for line in fleet.errors[:5]:
            print(f"  error: {line}")
        for line in fleet.committed_bad_log[:10]:
            print(f"  {line}")
        for d in devices:
            d.service.close()
        closed = True
        print(f"shadow worker threads left after close: {shadow_threads_left(30.0)}")
        print(f"total time {time.monotonic() - started:.1f} s")
        max_pct = 100.0 * fleet.max_committed_bad / len(devices)
        print(f"fleet_quiet_bad_release_max_pct={max_pct:g}")
        ok = all(results[v]["outcome"] == expected for v, _, expected in phases)
        return 0 if ok else 1
    finally:
        for d in devices:
            d.recorder.close()
            d.upload_store.close()
            if not closed:
                d.service.close()
        if server is not None and server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
