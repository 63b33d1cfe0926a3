"""Shared fixtures for the shipping tests: one wheel and one .deb per session, fake board trees."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "packaging" / "deb" / "build.sh"
INSTALL_SH = REPO / "packaging" / "install.sh"
UNIT = REPO / "systemd" / "edge-agent.service"
SYSTEM_PYTHON = Path("/usr/bin/python3")

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb missing")
needs_system_python = pytest.mark.skipif(
    not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 for the venv"
)


def run(
    argv: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["BUILD_PYTHON"] = sys.executable
    env["DEB_COMPRESSION"] = "gzip"
    env.update(env_extra or {})
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False)


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once (the same function build.sh and install.sh use)."""
    out = tmp_path_factory.mktemp("wheel")
    lib = REPO / "packaging" / "lib"
    script = f'EA_LIB_DIR="{lib}"; . "{lib}/common.sh"; '
    script += f'ea_build_wheel "{REPO}" "{out}" "{sys.executable}"'
    done = run(["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    wheel = Path(done.stdout.strip())
    assert wheel.name.startswith("edge_agent-") and wheel.suffix == ".whl"
    return wheel


@pytest.fixture(scope="session")
def fast_deb(tmp_path_factory: pytest.TempPathFactory, agent_wheel: Path) -> Path:
    """A real .deb whose venv holds only the agent (no dependencies): quick to build."""
    out = tmp_path_factory.mktemp("deb")
    done = run(["sh", str(BUILD_SH), "--no-deps", "--wheel", str(agent_wheel), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.is_file()
    return deb


SLOW = os.environ.get("EDGE_AGENT_SLOW") == "1"


@pytest.fixture(scope="session")
def full_deb(tmp_path_factory: pytest.TempPathFactory, agent_wheel: Path) -> Path:
    """The real .deb with every dependency in its venv (minutes; EDGE_AGENT_SLOW=1 tests)."""
    out = tmp_path_factory.mktemp("full")
    done = run(["sh", str(BUILD_SH), "--wheel", str(agent_wheel), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.is_file()
    return deb


@pytest.fixture(scope="session")
def deb_tree(tmp_path_factory: pytest.TempPathFactory, fast_deb: Path) -> Path:
    """The fast .deb unpacked with dpkg -x (files) and dpkg-deb -e (DEBIAN/)."""
    root = tmp_path_factory.mktemp("root")
    for argv in (
        ["dpkg", "-x", str(fast_deb), str(root)],
        ["dpkg-deb", "-e", str(fast_deb), str(root / "DEBIAN")],
    ):
        done = run(argv)
        assert done.returncode == 0, done.stderr
    return root


# ------------------------------------------------------------------ fake board trees


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def thermal_zone(sysfs: Path, index: int, kind: str, milli_c: int) -> None:
    zone = sysfs / "class" / "thermal" / f"thermal_zone{index}"
    write(zone / "type", kind + "\n")
    write(zone / "temp", f"{milli_c}\n")


def make_pi_tree(root: Path, throttled: str = "0x0", temp_milli_c: int = 48_300) -> Path:
    """A Raspberry Pi 4 as the kernel shows it: cpu-thermal, firmware get_throttled, video0."""
    sysfs = root / "sys"
    thermal_zone(sysfs, 0, "cpu-thermal", temp_milli_c)
    write(sysfs / "devices/platform/soc/soc:firmware/get_throttled", throttled + "\n")
    write(root / "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\x00")
    (root / "dev").mkdir(parents=True)
    (root / "dev" / "video0").write_bytes(b"")
    return root


def make_jetson_tree(root: Path) -> Path:
    """A Jetson Orin Nano: several thermal zones and INA3221 rails in hwmon, no camera."""
    sysfs = root / "sys"
    for i, (kind, milli) in enumerate(
        [
            ("cpu-thermal", 51_500),
            ("gpu-thermal", 49_000),
            ("soc0-thermal", 50_250),
            ("tj-thermal", 52_000),
        ]
    ):
        thermal_zone(sysfs, i, kind, milli)
    chip = sysfs / "class" / "hwmon" / "hwmon1"
    write(chip / "name", "ina3221\n")
    for index, (label, mv, ma) in enumerate(
        [("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400), ("VDD_SOC", 5000, 300)], 1
    ):
        write(chip / f"in{index}_label", label + "\n")
        write(chip / f"in{index}_input", f"{mv}\n")
        write(chip / f"curr{index}_input", f"{ma}\n")
    write(root / "proc/device-tree/model", "NVIDIA Jetson Orin Nano Developer Kit\x00")
    (root / "dev").mkdir(parents=True)
    return root


def make_bare_tree(root: Path) -> Path:
    """A VM or container: no thermal zones, no hwmon, no device tree, no camera."""
    (root / "sys" / "class" / "thermal").mkdir(parents=True)
    (root / "proc").mkdir(parents=True)
    (root / "dev").mkdir(parents=True)
    return root


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    path.mkdir(mode=0o750)
    path.chmod(0o750)
    yield path


def make_etc(
    root: Path,
    *,
    user: bool = True,
    in_video: bool = True,
    video_group: bool = True,
    uid: int = 999,
) -> Path:
    """passwd and group files as adduser --system leaves them (uid 999, group edge-agent)."""
    passwd = ["root:x:0:0:root:/root:/bin/bash"]
    groups = ["root:x:0:", "edge-agent:x:999:"]
    if user:
        passwd.append(f"edge-agent:x:{uid}:999::/var/lib/edge-agent:/usr/sbin/nologin")
    if video_group:
        groups.append("video:x:44:" + ("pi,edge-agent" if in_video else "pi"))
    write(root / "etc" / "passwd", "\n".join(passwd) + "\n")
    write(root / "etc" / "group", "\n".join(groups) + "\n")
    return root / "etc"


def install_unit(unit_dir: Path, text: str | None = None) -> Path:
    """An installed edge-agent.service (the repository's unit unless text is given)."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / "edge-agent.service"
    path.write_text(UNIT.read_text() if text is None else text)
    return path
