"""Fleet quality benchmark: a quietly bad release rolled out to >= 200 devices, each an OTAService.

The fleet: `edge-agent serve` (real TUF repository, OTLP ingest into a SQLite fleet store,
rollout controller every 0.5 s) on 127.0.0.1, and --devices simulated devices. Each device
is its own state dir with a real OTAService: the TUF channel client over HTTP, rollout
membership, download, signature and hash checks, the golden-set gate, activation into a
ModelSlot (SlotHost), probation on live frames and the journal. Each reports its ota.state
events through a real TelemetryRecorder (its own telemetry.db) drained by the real OTLP
exporter to the server. Frames come from the synthetic source with the field's look
(`contrast`, default 0.5: a washed-out camera), run through the live model the way the
daemon runs a frame (the package's preprocessing, the backend, top-1 post-processing),
and each frame's latency and confidence go to probation (observe_frame).

Shared to keep it to minutes: one loaded model session per package version (every device
runs the same bytes), and the gate's verdict per (current, candidate) pair: the first
device of a pair runs the real gate in its child process on golden_local/ (latency slack
raised, as in tests/ota: the latency check is noise on 2 shared cores), the others reuse
that outcome.

Shadow figures: when the device code reports `quality.shadow_agreement` on the ota.state
event that ends probation (issue 16's device-side shadow evaluation), the fleet uses the
device's figures. When it does not, this bench computes them from the same frames the
device's probation saw: the previous release's model (the one kept for rollback) runs
each frame too, and shadow_agreement, shadow_frames, confidence_delta,
class_hist_distance, latency_p95_ms and error_rate are added to that event's attributes.
The counts of each kind are printed.

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
from collections.abc import Mapping
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
from agent.ota import install  # noqa: E402
from agent.ota.gate_process import GateLimits, GateOutcome, GateRequest, run_gate_child  # noqa: E402
from agent.ota.journal import OTAState  # noqa: E402
from agent.ota.service import OTAService  # noqa: E402
from agent.package import build_keyring, load_public_key_file, write_keyring  # noqa: E402
from agent.package.build import build_package, sign_package  # noqa: E402
from agent.package.keys import load_signing_key  # noqa: E402
from agent.pipeline.model import (  # noqa: E402
    load_package_backend,
    package_model,
    package_model_file,
)
from agent.pipeline.postprocess import top_k_rows  # noqa: E402
from agent.pipeline.preprocess import Preprocessor  # noqa: E402
from agent.pipeline.slot import ActiveModel, ModelSlot  # noqa: E402
from agent.pipeline.sources import SyntheticSource  # noqa: E402
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
        self.shadow_from_device = 0
        self.shadow_from_bench = 0
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
class ShadowTally:
    """The bench's shadow run: the previous model on the frames the live one served."""

    frames: int = 0
    agree: int = 0
    errors: int = 0
    confidence_new: float = 0.0
    confidence_old: float = 0.0
    hist_new: list[int] = field(default_factory=lambda: [0] * 10)
    hist_old: list[int] = field(default_factory=lambda: [0] * 10)
    latencies_ms: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        served = self.frames + self.errors
        if served:
            out["quality.error_rate"] = self.errors / served
        if self.latencies_ms:
            out["quality.latency_p95_ms"] = float(np.percentile(self.latencies_ms, 95))
        if self.frames:
            n = self.frames
            out["quality.shadow_frames"] = n
            out["quality.shadow_agreement"] = self.agree / n
            out["quality.confidence_delta"] = (self.confidence_new - self.confidence_old) / n
            new = np.array(self.hist_new, dtype=float) / n
            old = np.array(self.hist_old, dtype=float) / n
            out["quality.class_hist_distance"] = float(0.5 * np.abs(new - old).sum())
        return out


class FigureRecorder:
    """A device's TelemetryRecorder; fills in the shadow figures on the event that ends
    probation when the device code sent none of its own (see the module docstring)."""

    def __init__(self, recorder: TelemetryRecorder, tally: ShadowTally, fleet: Fleet) -> None:
        self.recorder = recorder
        self.tally = tally
        self.fleet = fleet

    def event(self, name: str, attrs: Mapping[str, Any], priority: str = "event") -> None:
        if name == "ota.state" and attrs.get("state") in ("COMMITTED", "ROLLED_BACK"):
            tally = self.tally
            if tally.latencies_ms or tally.errors:
                with self.fleet.lock:
                    if "quality.shadow_agreement" in attrs:
                        self.fleet.shadow_from_device += 1
                    else:
                        # the figures the device sent itself win over the bench's
                        attrs = {**tally.figures(), **attrs}
                        self.fleet.shadow_from_bench += int(tally.frames > 0)
                self.tally.__init__()  # type: ignore[misc]  # reset for the next probation
        self.recorder.event(name, attrs, priority)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.recorder, name)


@dataclass
class Device:
    device_id: str
    service: OTAService
    slot: ModelSlot
    recorder: TelemetryRecorder
    source: SyntheticSource
    tally: ShadowTally
    upload_store: TelemetryStore
    telemetry: TelemetryConfig
    exporter: Any
    preprocessors: dict[int, Preprocessor] = field(default_factory=dict)
    probation_frames: int = 0

    def run_frame(self, model: ActiveModel, frame: Any) -> tuple[int, float, float]:
        """One frame through ``model`` as the daemon runs it: (top-1, confidence, latency_s)."""
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
        return int(best["class"]), float(best["score"]), latency_s


def previous_model(device: Device, fleet: Fleet) -> ActiveModel | None:
    """The model the device keeps for rollback, loaded as the live one is (for the shadow)."""
    service = device.service
    prev_dir = install.resolve(service.state_dir, install.PREVIOUS)
    manifest = service.current_manifest(install.PREVIOUS)
    if prev_dir is None or manifest is None:
        return None
    return package_model(fleet.load(prev_dir, manifest), prev_dir, manifest)


def run_probation(device: Device, fleet: Fleet, max_frames: int) -> None:
    """Live field frames through the new model until probation commits or rolls back."""
    service = device.service
    old = previous_model(device, fleet)
    for _ in range(max_frames):
        last = service.journal.last()
        if last is None or last.state is not OTAState.PROBATION:
            return
        frame = device.source.read(0.0)
        assert frame is not None
        model = device.slot.current()
        try:
            top, confidence, latency_s = device.run_frame(model, frame)
        except EdgeAgentError:
            device.tally.errors += 1
            service.observe_frame(0.0, None, error=True)
            continue
        tally = device.tally
        if old is not None:
            old_top, old_confidence, _ = device.run_frame(old, frame)
            tally.frames += 1
            tally.agree += int(top == old_top)
            tally.confidence_new += confidence
            tally.confidence_old += old_confidence
            tally.hist_new[top % 10] += 1
            tally.hist_old[old_top % 10] += 1
        tally.latencies_ms.append(latency_s * 1000.0)
        device.probation_frames += 1
        service.observe_frame(latency_s, confidence)


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
    run_probation(device, fleet, max_frames)
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
            fleet.committed_bad.add(device.device_id)
        else:
            fleet.committed_bad.discard(device.device_id)
        fleet.max_committed_bad = max(fleet.max_committed_bad, len(fleet.committed_bad))


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
    i: int, work: Path, url: str, token: str, golden: Path, keyring: Any, fleet: Fleet, args: Any
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
    tally = ShadowTally()
    slot = ModelSlot()
    service = OTAService(
        config,
        recorder=FigureRecorder(recorder, tally, fleet),
        slot=slot,
        load_model=fleet.load,
    )
    service.gate = fleet.gate_for(service)
    source = SyntheticSource((8, 8), "digits", seed=i, contrast=args.contrast)
    upload_store = TelemetryStore(
        state / "telemetry.db", device_id, "boot-1", check_integrity=False
    )
    return Device(
        device_id,
        service,
        slot,
        recorder,
        source,
        tally,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--contrast", type=float, default=0.5, help="the field's look")
    parser.add_argument("--probation-frames", type=int, default=50)
    parser.add_argument("--max-probation-frames", type=int, default=400)
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
        policy_yaml = golden / "policy.yaml"
        policy_yaml.write_text(
            policy_yaml.read_text().replace(
                "latency_p95_slack_ms: 0.5", "latency_p95_slack_ms: 1000"
            )
        )
        tokens_path = work / "tokens.json"
        ids = [f"dev-{i:04d}" for i in range(args.devices)]
        tokens = {d: add_device_token(tokens_path, d) for d in ids}
        operator = {"Authorization": f"Bearer {add_operator_token(tokens_path, 'bench')}"}
        server, url = start_server(work, repo, keys_dir, tokens_path)
        fleet = Fleet(AgentConfig())
        devices = [
            make_device(i, work, url, tokens[d], golden, keyring, fleet, args)
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
        print(
            f"shadow figures on probation's last event: from the device code "
            f"{fleet.shadow_from_device}, computed by this bench {fleet.shadow_from_bench}; "
            f"gates run {fleet.gate_runs}, step errors {len(fleet.errors)}"
        )
        for line in fleet.errors[:5]:
            print(f"  error: {line}")
        print(f"total time {time.monotonic() - started:.1f} s")
        max_pct = 100.0 * fleet.max_committed_bad / len(devices)
        print(f"fleet_quiet_bad_release_max_pct={max_pct:g}")
        ok = all(results[v]["outcome"] == expected for v, _, expected in phases)
        return 0 if ok else 1
    finally:
        for d in devices:
            d.recorder.close()
            d.upload_store.close()
            d.service.close()
        if server is not None and server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
