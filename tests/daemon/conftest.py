"""Helpers for the daemon's tests: a fake sysfs tree, configs on disk, the demo models."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "agent" / "demo" / "models"


@pytest.fixture
def digits_model(tmp_path: Path) -> Path:
    """The digits demo model, or a small MLP with the same interface while it is not built."""
    demo = DEMO / "digits_fp32.onnx"
    if demo.exists():
        return demo
    from demo_models import MLPWeights, mlp_onnx

    rng = np.random.default_rng(0)
    w = MLPWeights(
        rng.normal(0, 0.3, (64, 16)).astype(np.float32),
        np.zeros(16, np.float32),
        rng.normal(0, 0.3, (16, 10)).astype(np.float32),
        np.zeros(10, np.float32),
    )
    return mlp_onnx(w, tmp_path / "digits.onnx")


class FakeSysfs:
    """A temp dir laid out like /sys: thermal zones, hwmon chips, RPi and Jetson files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def zone(self, index: int, temp_c: float | str, kind: str = "cpu-thermal") -> Path:
        zone = self.root / "class" / "thermal" / f"thermal_zone{index}"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "type").write_text(kind + "\n")
        value = temp_c if isinstance(temp_c, str) else str(round(temp_c * 1000))
        (zone / "temp").write_text(value + "\n")
        return zone / "temp"

    def set_temp(self, index: int, temp_c: float) -> None:
        path = self.root / "class" / "thermal" / f"thermal_zone{index}" / "temp"
        tmp = path.with_name(".temp.tmp")
        tmp.write_text(f"{round(temp_c * 1000)}\n")
        tmp.replace(path)

    def hwmon(self, index: int, name: str, files: Mapping[str, str]) -> Path:
        chip = self.root / "class" / "hwmon" / f"hwmon{index}"
        chip.mkdir(parents=True, exist_ok=True)
        (chip / "name").write_text(name + "\n")
        for fname, value in files.items():
            (chip / fname).write_text(value + "\n")
        return chip

    def throttled(self, word: str) -> Path:
        path = self.root / "devices" / "platform" / "soc" / "soc:firmware" / "get_throttled"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(word + "\n")
        return path

    def ina3221(self, rails: Mapping[str, float]) -> None:
        dev = self.root / "bus" / "i2c" / "drivers" / "ina3221x" / "1-0040" / "iio:device0"
        dev.mkdir(parents=True, exist_ok=True)
        for i, (name, milliwatts) in enumerate(rails.items()):
            (dev / f"rail_name_{i}").write_text(name + "\n")
            (dev / f"in_power{i}_input").write_text(f"{int(milliwatts)}\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str))))
    return path


@pytest.fixture
def make_config(tmp_path: Path, digits_model: Path) -> Callable[..., Path]:
    """Write an agent config for the digits model; keyword sections override the defaults."""

    def make(name: str = "agent.yaml", **sections: Any) -> Path:
        # short path: a Unix socket path must stay under ~100 bytes
        state = sections.pop("state_dir", None) or str(tmp_path / "st")
        data: dict[str, Any] = {
            "state_dir": state,
            "model": {
                "path": str(digits_model),
                "warmup_runs": 1,
                "labels": [str(i) for i in range(10)],
            },
            "preprocess": {"resize": [8, 8], "color_order": "GRAY", "scale": 1 / 255},
            "source": {"kind": "synthetic"},
            "scheduler": {"fps_cap": 20, "drain_timeout_s": 2.0},
            "governor": {
                "enabled": True,
                "sysfs_root": str(tmp_path / "sys"),
                "interval_s": 0.2,
                "use_psutil": False,
            },
            "sinks": [{"kind": "jsonl", "path": str(tmp_path / "out" / "results.jsonl")}],
            "telemetry": {"enabled": False},
            "status": {"interval_s": 0.2},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return write_config(tmp_path / name, data)

    return make


def wait_for(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (tests wait on behaviour, not time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class NotifyListener:
    """A real datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def seen(self, field: str) -> bool:
        return any(field in m.split("\n") for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def which(name: str) -> str | None:
    return shutil.which(name)


class Helpers:
    """The helpers above, handed to tests as a fixture (conftest is not importable by name
    under --import-mode=importlib)."""

    FakeSysfs = FakeSysfs
    NotifyListener = NotifyListener
    wait_for = staticmethod(wait_for)
    write_config = staticmethod(write_config)
    agent_cmd = staticmethod(agent_cmd)
    has_cv2 = staticmethod(has_cv2)
    which = staticmethod(which)


@pytest.fixture
def helpers() -> type[Helpers]:
    return Helpers
