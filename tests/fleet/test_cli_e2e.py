"""Operator CLI end to end: keys, repo, publish, rollout, `edge-agent serve` with devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fleet_testlib import build_package, device_fetch_channel, ota_record, provision_device

from agent.fleet.keys import load_key_dir
from agent.fleet.rollout import is_member
from agent.telemetry.uploader import OtlpHttpExporter

CLI = [sys.executable, "-m", "agent.cli"]


def run_cli(*args: str | Path, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


@pytest.fixture()
def keys_dir(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    for role in ("root", "targets", "snapshot", "timestamp", "rollout"):
        run_cli("keys", "generate", "--role", role, "--out", out)
    for i in (1, 2):
        run_cli("keys", "generate", "--role", "release", "--name", f"release-{i}", "--out", out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def operator_repo(tmp_path: Path, keys_dir: Path) -> Path:
    repo = tmp_path / "repo"
    out = run_cli("repo", "init", repo, "--keys", keys_dir, "--release-threshold", "2")
    assert "repository created" in out.stdout
    release = [k for k in load_key_dir(keys_dir) if k.role == "release"]
    pkg = build_package(tmp_path / "dist", release, version="1.1.0", release_counter=2)
    out = run_cli("publish", pkg, "--repo", repo, "--keys", keys_dir)
    assert "published digits 1.1.0" in out.stdout
    return repo


def test_cli_errors_are_one_line_with_exit_codes(
    tmp_path: Path, keys_dir: Path, operator_repo: Path
) -> None:
    release = [k for k in load_key_dir(keys_dir) if k.role == "release"]
    unsigned = build_package(tmp_path / "u", [], version="1.2.0", release_counter=3)
    under = build_package(tmp_path / "o", release[:1], version="1.2.0", release_counter=3)
    cases = [
        (("publish", unsigned, "--repo", operator_repo, "--keys", keys_dir), 3, "signature"),
        (("publish", under, "--repo", operator_repo, "--keys", keys_dir), 3, "signature"),
        (
            ("publish", tmp_path / "missing.tar", "--repo", operator_repo, "--keys", keys_dir),
            2,
            "not found",
        ),
        (
            ("publish", unsigned, "--repo", tmp_path / "nothing", "--keys", keys_dir),
            3,
            "not a repository",
        ),
        (("repo", "init", operator_repo, "--keys", keys_dir), 2, "already holds"),
        (
            (
                "rollout",
                "promote",
                "--channel",
                "stable",
                "--repo",
                operator_repo,
                "--keys",
                keys_dir,
            ),
            2,
            "no rollout",
        ),
        (
            (
                "rollout",
                "start",
                "--channel",
                "stable",
                "--version",
                "1.1.0",
                "--repo",
                operator_repo,
                "--keys",
                keys_dir,
                "--stages",
                "1,50",
            ),
            2,
            "last stage",
        ),
        (
            (
                "rollout",
                "start",
                "--channel",
                "Bad Name",
                "--version",
                "1.1.0",
                "--repo",
                operator_repo,
                "--keys",
                keys_dir,
            ),
            2,
            "channel name",
        ),
        (("serve", "--repo", tmp_path / "nothing"), 2, "not a repository"),
        (
            ("serve", "--repo", operator_repo, "--db", "postgresql://u@db/fleet?bogus=1"),
            2,
            "not a valid PostgreSQL URL",
        ),
        # Nothing listens there: a clear line naming the server, never the password.
        (
            (
                "serve",
                "--repo",
                operator_repo,
                "--db",
                f"postgresql://u:s3cret@127.0.0.1:{_free_port()}/f",
            ),
            1,
            "cannot connect",
        ),
        (("rollout",), 2, ""),
    ]
    for args, code, text in cases:
        proc = run_cli(*args, check=None)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        if text:
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
            assert text in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        assert "s3cret" not in proc.stderr


def test_every_fleet_command_has_help_with_an_example() -> None:
    for args in (
        ("repo", "init"),
        ("repo", "refresh"),
        ("repo", "rotate-root"),
        ("publish",),
        ("rollout", "start"),
        ("rollout", "promote"),
        ("rollout", "pause"),
        ("rollout", "resume"),
        ("rollout", "abort"),
        ("rollout", "status"),
        ("serve",),
        ("token", "add"),
        ("token", "revoke"),
    ):
        out = run_cli(*args, "--help").stdout
        assert "example:\n  edge-agent " + args[0] in out, args


def test_serve_promotes_on_canary_reports_and_survives_sigkill(
    tmp_path: Path, keys_dir: Path, operator_repo: Path
) -> None:
    """Tokens are read when the server starts, so they are written first."""
    port = _free_port()
    db = tmp_path / "fleet.db"
    tokens_path = tmp_path / "tokens.json"
    run_cli(
        "rollout",
        "start",
        "--channel",
        "stable",
        "--version",
        "1.1.0",
        "--repo",
        operator_repo,
        "--keys",
        keys_dir,
        "--soak-s",
        "0",
        "--min-devices",
        "2",
        "--package",
        "digits",
    )
    salt = json.loads((operator_repo / "rollouts" / "stable.json").read_text())["salt"]
    canaries = [d for d in (f"cam-{i}" for i in range(5000)) if is_member(d, salt, 1.0)][:2]
    others = [f"pi-{i}" for i in range(3)]
    tokens = {
        d: run_cli("token", "add", "--tokens", tokens_path, "--device", d).stdout.strip()
        for d in canaries + others
    }
    operator = run_cli("token", "add", "--tokens", tokens_path, "--operator", "ops").stdout.strip()
    ops = {"Authorization": f"Bearer {operator}"}
    cmd = [
        *CLI,
        "serve",
        "--repo",
        str(operator_repo),
        "--db",
        str(db),
        "--tokens",
        str(tokens_path),
        "--keys",
        str(keys_dir),
        "--port",
        str(port),
        "--controller-interval-s",
        "0.3",
    ]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    return proc
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)

    proc = start()
    try:
        assert requests.post(f"{url}/v1/logs", json={}, timeout=5).status_code == 401
        # Devices read the channel through the server with the real OTA channel client.
        for device in canaries + others:
            state_dir = tmp_path / "devices" / device
            provision_device(state_dir, operator_repo)
            doc = device_fetch_channel(state_dir, url).document
            assert (doc.version, doc.percent, doc.salt) == ("1.1.0", 1.0, salt)
        now = time.time_ns()
        for device in others:
            exporter = OtlpHttpExporter(url, headers={"Authorization": f"Bearer {tokens[device]}"})
            assert exporter.send([ota_record(device, 1, "IDLE", "", now)]).outcome == "acked"
        # Both canaries are heard from before either commits: the stage needs
        # min(min_devices, members heard from) commits, so a canary that committed before
        # the other one was known could promote the stage alone.
        exporters = {
            device: OtlpHttpExporter(url, headers={"Authorization": f"Bearer {tokens[device]}"})
            for device in canaries
        }
        for device in canaries:
            batch = [ota_record(device, 1, "DOWNLOADING", "1.1.0", now)]
            assert exporters[device].send(batch).outcome == "acked"
        for device in canaries:
            batch = [ota_record(device, 2, "COMMITTED", "1.1.0", now + 1)]
            assert exporters[device].send(batch).outcome == "acked"
        deadline = time.monotonic() + 60
        while (
            requests.get(f"{url}/api/rollouts/stable", headers=ops, timeout=5).json()["stage"] < 1
        ):
            assert time.monotonic() < deadline, "controller did not promote"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # After a SIGKILL the data is intact and re-sent rows are still recognised as duplicates.
    proc = start()
    try:
        device = canaries[0]
        exporter = OtlpHttpExporter(url, headers={"Authorization": f"Bearer {tokens[device]}"})
        assert exporter.send([ota_record(device, 2, "COMMITTED", "1.1.0", now + 1)]).outcome == (
            "acked"
        )
        status = requests.get(f"{url}/api/rollouts/stable", headers=ops, timeout=5).json()
        assert status["committed"] == 2 and status["percent"] >= 10.0
        table = run_cli(
            "rollout",
            "status",
            "--channel",
            "stable",
            "--server",
            url,
            "--operator-token",
            operator,
        ).stdout
        assert "committed" in table and "failure rate" in table
        page = requests.get(url, headers=ops, timeout=5).text
        assert "<svg" in page and 'data-version="1.1.0"' in page
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    out = run_cli(
        "rollout", "status", "--channel", "stable", "--repo", operator_repo, "--db", db
    ).stdout
    assert "COMMITTED" in out and "1.1.0" in out
    history = json.loads((operator_repo / "rollouts" / "stable.json").read_text())["history"]
    assert history[1]["action"] == "promote" and history[1]["committed"] == 2
