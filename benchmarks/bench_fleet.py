"""Fleet rollout benchmark: >= 200 simulated devices against `edge-agent serve` on 127.0.0.1.

Each device has its own state dir and uses the real OTA pieces: the TUF channel client
(agent.ota.channel), rollout membership (agent.ota.membership), the package reader
(agent.package.verify_package) and the golden-set gate (agent.ota.golden.run_gate; run once
per (current, candidate) pair because every simulated device is the same hardware), and
reports ota.state events over OTLP/HTTP with the telemetry area's exporter.

Phases, interleaved in one run: staged (1 -> 10 -> 100 %) vs all-at-once (100 %) for a bad
release (fails the gate on its canaries) and for a good one. The last line is
`fleet_bad_release_max_pct=<x>`: the highest channel percent the staged bad release reached.

    .venv/bin/python benchmarks/bench_fleet.py --devices 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from agent.errors import FetchError  # noqa: E402
from agent.fleet.keys import generate_key_files, load_key_dir  # noqa: E402
from agent.fleet.repo import init_repo, publish_package  # noqa: E402
from agent.fleet.rollout import RolloutPolicy, load_state, start_rollout  # noqa: E402
from agent.fleet.tokens import add_device_token, add_operator_token  # noqa: E402
from agent.ota.channel import ChannelClient  # noqa: E402
from agent.ota.golden import run_gate  # noqa: E402
from agent.ota.journal import Journal  # noqa: E402
from agent.ota.membership import in_rollout  # noqa: E402
from agent.package import (  # noqa: E402
    build_keyring,
    load_public_key_file,
    read_package,
    verify_package,
)
from agent.package.build import build_package, sign_package  # noqa: E402
from agent.package.keys import load_signing_key  # noqa: E402
from agent.telemetry.store import StoredRecord  # noqa: E402
from agent.telemetry.uploader import OtlpHttpExporter  # noqa: E402

DEMO = REPO_ROOT / "agent" / "demo" / "models"
GOLDEN = REPO_ROOT / "golden_local"
SCHEMA = """\
name: digits
task: classification
inputs: [{name: input, dtype: float32, shape: [null, 1, 8, 8]}]
outputs: [{name: logits, dtype: float32, shape: [null, 10]}]
labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
"""


@dataclass
class Device:
    device_id: str
    state_dir: Path
    token: str
    journal: Journal
    client: ChannelClient
    exporter: OtlpHttpExporter
    running: str = "1.0.0"
    previous: str = ""
    seq: int = 0
    boot_id: str = "boot-1"
    refused: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    fetch_errors: int = 0
    upload_retries: int = 0
    pending: list[StoredRecord] = field(default_factory=list)

    def event(self, state: str, version: str, reason: str, channel: str) -> StoredRecord:
        self.seq += 1
        now = time.time_ns()
        attrs = {
            "state": state,
            "package": "digits",
            "version": version,
            "from_version": self.running,
            "reason": reason,
            "channel": channel,
        }
        return StoredRecord(
            self.seq,
            self.device_id,
            self.boot_id,
            self.seq,
            "event",
            2,
            "ota.state",
            now,
            now,
            True,
            attrs,
            200,
        )


class GateOracle:
    """The real gate, run once per (current, candidate) pair and shared by identical devices."""

    def __init__(self, work: Path, keyring: Any) -> None:
        self.work, self.keyring = work, keyring
        self.models: dict[str, Path] = {"1.0.0": DEMO / "digits_fp32.onnx"}
        self.results: dict[tuple[str, str], bool] = {}
        self.lock = threading.Lock()

    def passes(self, current: str, candidate: str, tar: Path) -> bool:
        with self.lock:
            if (current, candidate) not in self.results:
                if candidate not in self.models:
                    pkg = read_package(tar, self.keyring, self.work / f"gate-{candidate}")
                    self.models[candidate] = pkg.model_path
                report = run_gate(self.models[current], self.models[candidate], GOLDEN)
                self.results[(current, candidate)] = bool(report.passed)
                print(
                    f"gate {current} -> {candidate}: {'pass' if report.passed else 'FAIL'}",
                    flush=True,
                )
            return self.results[(current, candidate)]


# The server's read API needs an operator token; main() adds one to the tokens file.
OPERATOR: dict[str, str] = {}


def poll(device: Device, channel: str, keyring: Any, gate: GateOracle) -> None:
    """One check of the channel, as an agent's update loop would do it."""
    try:
        doc = device.client.fetch_channel(channel)
    except FetchError as exc:  # a real agent retries at its next poll
        device.fetch_errors += 1
        print(f"{device.device_id}: {exc}", file=sys.stderr)
        return
    ch = doc.document
    events: list[StoredRecord] = []
    if ch.aborted and device.running in ch.revert_versions and device.previous:
        events.append(device.event("ROLLED_BACK", device.running, "channel revert", channel))
        device.running, device.previous = device.previous, ""
    elif (
        not ch.aborted
        and not ch.paused
        and ch.version != device.running
        and ch.version not in device.refused
        and in_rollout(device.device_id, ch.salt, ch.percent)
    ):
        device.attempted.add(ch.version)
        events.append(device.event("DOWNLOADING", ch.version, "", channel))
        tar = device.state_dir / "staging" / doc.package.filename
        tar.parent.mkdir(parents=True, exist_ok=True)
        data = requests.get(doc.package.url, timeout=30).content
        if hashlib.sha256(data).hexdigest() != doc.package.sha256:
            raise RuntimeError(f"{device.device_id}: package hash mismatch")
        tar.write_bytes(data)
        verify_package(tar, keyring)
        if gate.passes(device.running, ch.version, tar):
            events.append(device.event("ACTIVATING", ch.version, "", channel))
            events.append(device.event("COMMITTED", ch.version, "", channel))
            device.previous, device.running = device.running, ch.version
        else:
            events.append(device.event("REJECTED", ch.version, "gate failed", channel))
            device.refused.add(ch.version)
        tar.unlink()
    device.pending += events
    if device.pending:
        result = device.exporter.send(device.pending)
        if result.outcome == "acked":
            device.pending = []
        elif result.outcome == "retry":  # as the real uploader: keep the rows, try next poll
            device.upload_retries += 1
        else:
            raise RuntimeError(f"{device.device_id}: upload {result.outcome}: {result.detail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_release(work: Path, keys_dir: Path, model: Path, version: str, counter: int) -> Path:
    schema = work / "schema.yaml"
    schema.write_text(SCHEMA)
    pkg, _ = build_package(model, schema, work / "dist", version=version, release_counter=counter)
    for name in ("release-1", "release-2"):
        sign_package(pkg, load_signing_key(keys_dir / f"{name}.key"))
    return pkg


def scaled_logits_model(out: Path) -> Path:
    """A bad release: same argmax, logits x0.25, so calibration fails the gate."""
    from demo_models import MLPWeights, mlp_onnx

    weights = MLPWeights.load(DEMO / "digits_mlp_weights.npz")
    return mlp_onnx(weights, out, logit_scale=0.25)


def run_phase(
    name: str,
    devices: list[Device],
    repo: Path,
    keys: Any,
    version: str,
    stages: tuple[float, ...],
    url: str,
    keyring: Any,
    gate: GateOracle,
    max_rounds: int,
) -> dict[str, Any]:
    policy = RolloutPolicy(stages_percent=stages, soak_s=1.0, min_devices=2, max_failure_rate=0.05)
    salt = hashlib.sha256(f"bench-{version}".encode()).hexdigest()[:32]
    start_rollout(repo, "stable", version, keys, policy, package="digits", salt=salt)
    started = time.monotonic()
    max_pct = 0.0
    per_stage: dict[float, int] = {}
    outcome = "timeout"
    for _ in range(max_rounds):
        status = requests.get(f"{url}/api/rollouts/stable", headers=OPERATOR, timeout=10).json()
        max_pct = max(max_pct, status["percent"])
        installed_now = sum(d.running == version for d in devices)
        if status["aborted"]:
            outcome = "aborted"
            break
        # "Full rollout" means every device runs it, not just the controller's last decision.
        if status["completed"] and installed_now == len(devices):
            outcome = "complete"
            break
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda d: poll(d, "stable", keyring, gate), devices))
        running = sum(d.running == version for d in devices)
        per_stage[status["percent"]] = max(per_stage.get(status["percent"], 0), running)
        time.sleep(0.5)  # the server's controller runs every 0.3 s
    elapsed = time.monotonic() - started
    state = load_state(repo, "stable")
    attempted = sum(version in d.attempted for d in devices)
    installed = sum(d.running == version for d in devices)
    stage_text = " ".join(f"{p:g}%:{n}" for p, n in sorted(per_stage.items()))
    print(
        f"phase={name} version={version} outcome={outcome} time_s={elapsed:.1f} "
        f"max_pct={max_pct:g} attempted={attempted} ({100 * attempted / len(devices):.1f}%) "
        f"installed={installed} seen_running_per_stage[{stage_text}]",
        flush=True,
    )
    for h in state.history:
        print(
            f"  decision {h['action']} at {h['percent']:g}%: committed={h.get('committed', '-')} "
            f"failed={h.get('failed', '-')} reports={h.get('reports', '-')} ({h['reason']})"
        )
    return {
        "outcome": outcome,
        "time_s": elapsed,
        "max_pct": max_pct,
        "attempted": attempted,
        "installed": installed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--max-rounds", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server: subprocess.Popen[str] | None = None
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
        good = DEMO / "digits_fp32.onnx"
        bad = scaled_logits_model(work / "digits_scaled.onnx")
        releases = [
            ("1.0.0", good),
            ("1.1.0", bad),
            ("1.2.0", bad),
            ("1.3.0", good),
            ("1.4.0", good),
        ]
        for counter, (version, model) in enumerate(releases, start=1):
            publish_package(repo, build_release(work, keys_dir, model, version, counter), keys)

        tokens_path = work / "tokens.json"
        ids = [f"dev-{i:04d}" for i in range(args.devices)]
        tokens = {d: add_device_token(tokens_path, d) for d in ids}
        OPERATOR["Authorization"] = f"Bearer {add_operator_token(tokens_path, 'bench')}"
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
                str(tokens_path),
                "--keys",
                str(keys_dir),
                "--port",
                str(port),
                "--controller-interval-s",
                "0.3",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("edge-agent serve did not start")
            time.sleep(0.1)

        devices = []
        for d in ids:
            state_dir = work / "devices" / d
            (state_dir / "tuf").mkdir(parents=True)
            shutil.copy(repo / "metadata" / "1.root.json", state_dir / "tuf" / "root.json")
            journal = Journal(state_dir / "state.db")
            exporter = OtlpHttpExporter(url, headers={"Authorization": f"Bearer {tokens[d]}"})
            device = Device(
                d, state_dir, tokens[d], journal, ChannelClient(state_dir, url, journal), exporter
            )
            devices.append(device)
            exporter.send([device.event("IDLE", "", "hello", "stable")])
        gate = GateOracle(work, keyring)
        print(f"devices={len(devices)} server={url}", flush=True)

        staged = (1.0, 10.0, 100.0)
        once = (100.0,)
        bad_staged = run_phase(
            "staged-bad", devices, repo, keys, "1.1.0", staged, url, keyring, gate, args.max_rounds
        )
        bad_once = run_phase(
            "all-at-once-bad",
            devices,
            repo,
            keys,
            "1.2.0",
            once,
            url,
            keyring,
            gate,
            args.max_rounds,
        )
        good_staged = run_phase(
            "staged-good", devices, repo, keys, "1.3.0", staged, url, keyring, gate, args.max_rounds
        )
        good_once = run_phase(
            "all-at-once-good",
            devices,
            repo,
            keys,
            "1.4.0",
            once,
            url,
            keyring,
            gate,
            args.max_rounds,
        )
        n = len(devices)
        print(
            f"bad release devices exposed: staged={100 * bad_staged['attempted'] / n:.1f}% "
            f"all-at-once={100 * bad_once['attempted'] / n:.1f}%"
        )
        print(
            f"good release time to 100%: staged={good_staged['time_s']:.1f}s "
            f"all-at-once={good_once['time_s']:.1f}s "
            f"(installed {good_staged['installed']}/{n} and {good_once['installed']}/{n})"
        )
        print(
            f"retried next poll: fetch errors {sum(d.fetch_errors for d in devices)}, "
            f"uploads {sum(d.upload_retries for d in devices)}"
        )
        print(f"fleet_good_full_rollout_s={good_staged['time_s']:.1f}")
        print(f"fleet_bad_release_max_pct={bad_staged['max_pct']:g}")
        ok = bad_staged["outcome"] == "aborted" and good_staged["outcome"] == "complete"
        for d in devices:
            d.journal.close()
        return 0 if ok else 1
    finally:
        if server is not None and server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        if os.environ.get("BENCH_KEEP") is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(json.dumps({"work": str(work)}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
