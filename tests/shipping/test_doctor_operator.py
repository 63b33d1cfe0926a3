"""`edge-agent doctor`'s operator checks over real subprocesses: config, golden set, model,
daemon, telemetry backlog; and the table fits 80 columns with each fix on its own line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

CLI = [sys.executable, "-m", "agent.cli"]
ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"


def _no_golden(tmp: Path, cfg: dict) -> None:
    cfg["ota"] = {"enabled": True}


def _good_golden(tmp: Path, cfg: dict) -> None:
    shutil.copytree(ROOT / "golden_local", tmp / "golden")
    cfg["ota"] = {"enabled": True, "golden_dir": str(tmp / "golden")}


def _corrupt_golden(tmp: Path, cfg: dict) -> None:
    shutil.copytree(ROOT / "golden_local", tmp / "golden")
    (tmp / "golden" / "labels.npy").write_bytes(b"\x93NUMPY garbage")
    cfg["ota"] = {"enabled": True, "golden_dir": str(tmp / "golden")}


def _no_model(tmp: Path, cfg: dict) -> None:
    cfg["model"] = {"path": str(tmp / "gone.onnx")}


def _live_status(tmp: Path, cfg: dict) -> None:
    # This test process stands in for the daemon: a live pid and a fresh update.
    snap = {"pid": os.getpid(), "state": "running", "updated": time.time(), "fps": 5.0}
    (tmp / "st" / "status.json").write_text(json.dumps(snap))


def _stalled_status(tmp: Path, cfg: dict) -> None:
    snap = {"pid": os.getpid(), "state": "running", "updated": time.time() - 600, "fps": 5.0}
    (tmp / "st" / "status.json").write_text(json.dumps(snap))


def _dead_status(tmp: Path, cfg: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    snap = {"pid": proc.pid, "state": "running", "updated": time.time(), "fps": 5.0}
    (tmp / "st" / "status.json").write_text(json.dumps(snap))


def _stuck_backlog(tmp: Path, cfg: dict) -> None:
    from agent.telemetry.store import NewRecord, TelemetryStore

    store = TelemetryStore(tmp / "st" / "telemetry.db", "pi-1", "boot-1", 1 << 20, "NORMAL")
    now = time.time_ns()
    store.append([NewRecord("event", 2, "daemon.start", now, now, True, {}) for _ in range(5)])
    store.set_meta("upload.last_error", "http://127.0.0.1:9: connection refused")
    store.close()
    cfg["telemetry"] = {"enabled": True, "endpoint": "http://127.0.0.1:9"}


@dataclass(frozen=True)
class DoctorCase:
    id: str
    setup: Callable[[Path, dict], None]  # what the device's state holds
    check: str
    status: str
    detail: str


CASES = [
    DoctorCase("ota-without-golden-set", _no_golden, "golden set", "fail", "ota.golden_dir"),
    DoctorCase("golden-set-readable", _good_golden, "golden set", "ok", "rows"),
    DoctorCase("golden-set-corrupt", _corrupt_golden, "golden set", "fail", "labels.npy"),
    DoctorCase("model-path-missing", _no_model, "active model", "fail", "not found"),
    DoctorCase("model-path-present", lambda t, c: None, "active model", "ok", "model.path"),
    DoctorCase("no-daemon", lambda t, c: None, "daemon", "warn", "no status file"),
    DoctorCase("daemon-running", _live_status, "daemon", "ok", "running, pid"),
    DoctorCase("daemon-stalled", _stalled_status, "daemon", "fail", "stalled"),
    DoctorCase("daemon-died", _dead_status, "daemon", "warn", "not running"),
    DoctorCase("backlog-not-leaving", _stuck_backlog, "telemetry", "warn", "connection refused"),
    DoctorCase("no-telemetry-store", lambda t, c: None, "telemetry", "ok", "no store yet"),
]


def _doctor(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "doctor", "--state-dir", str(tmp / "st"), "--sysfs-root", str(tmp / "sys"),
         "--dev-root", str(tmp / "dev"), "--proc-root", str(tmp / "proc"), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_operator_checks(tmp_path: Path, case: DoctorCase) -> None:
    (tmp_path / "st").mkdir(mode=0o750)
    cfg: dict = {"state_dir": str(tmp_path / "st"), "model": {"path": str(DIGITS)}}
    case.setup(tmp_path, cfg)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = _doctor(tmp_path, "--config", str(config), "--json")
    assert done.returncode in (0, 3), done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    row = checks[case.check]
    assert row["status"] == case.status, row
    assert case.detail in row["detail"], row
    assert checks["config"]["status"] == "ok"
    if case.status == "fail":
        assert done.returncode == 3


def test_table_fits_80_columns_and_warns_about_defaults(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir(mode=0o750)
    default = Path("/etc/edge-agent/agent.yaml")
    if default.exists():
        pytest.skip(f"{default} exists here, so the defaults warning cannot show")
    done = _doctor(tmp_path)
    assert done.returncode in (0, 3), done.stderr
    lines = done.stdout.splitlines()
    # Words are never split: a line may pass 80 columns only as one word too long for
    # the room beside the check names (a long path in a fix), alone on its line.
    room = 6 + max(len(line[6:].split("  ")[0]) for line in lines if line[:1].isupper()) + 2
    too_wide = [line for line in lines if len(line) > 80 and len(line[room:].split()) > 1]
    assert not too_wide, too_wide
    assert lines[0].startswith("WARN  config") and "built-in defaults" in lines[1]
    fixes = [line for line in lines if line.strip().startswith("fix: ")]
    assert fixes and all(line.startswith(" " * 8) for line in fixes)  # under the detail
    assert any(line.startswith(("OK    golden set", "SKIP  golden set")) for line in lines)


def test_golden_rows_counted(tmp_path: Path) -> None:
    labels = np.load(ROOT / "golden_local" / "labels.npy")
    cfg = {"state_dir": str(tmp_path / "st"), "model": {"path": str(DIGITS)}}
    (tmp_path / "st").mkdir(mode=0o750)
    _good_golden(tmp_path, cfg)
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    done = _doctor(tmp_path, "--config", str(tmp_path / "agent.yaml"), "--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["golden set"]["detail"].endswith(f"{len(labels)} rows")
