"""The .deb: built for real with dpkg-deb, then its fields, files, scripts and unit checked."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import agent
from agent.config import AgentConfig, load_config

from .conftest import BUILD_SH, REPO, UNIT, needs_dpkg, needs_system_python, run

pytestmark = [needs_dpkg, needs_system_python]


def control_fields(deb: Path) -> dict[str, str]:
    done = run(["dpkg-deb", "-f", str(deb)])
    assert done.returncode == 0, done.stderr
    fields: dict[str, str] = {}
    for line in done.stdout.splitlines():
        if line and not line.startswith(" ") and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def test_file_name_and_control_fields(fast_deb: Path) -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert fast_deb.name == f"edge-agent_{version.group(1)}_{arch}.deb"
    fields = control_fields(fast_deb)
    assert fields["Package"] == "edge-agent"
    assert fields["Version"] == version.group(1)
    assert fields["Architecture"] == arch
    depends = fields["Depends"]
    for needed in ("python3 (>= 3.", "python3 (<< 3.", "adduser", "init-system-helpers"):
        assert needed in depends
    assert int(fields["Installed-Size"]) > 0


def test_conffiles_and_maintainer_scripts_listed(fast_deb: Path) -> None:
    done = run(["dpkg-deb", "-I", str(fast_deb)])
    assert done.returncode == 0, done.stderr
    for member in ("conffiles", "control", "postinst", "prerm", "postrm"):
        assert re.search(rf"\s{member}\s", done.stdout), member


def test_contents_owned_by_root(fast_deb: Path) -> None:
    listing = run(["dpkg-deb", "-c", str(fast_deb)]).stdout.splitlines()
    assert listing
    assert all(" root/root " in line for line in listing), [
        line for line in listing if " root/root " not in line
    ][:3]
    names = {line.split()[5] for line in listing}
    for expected in (
        "./etc/edge-agent/agent.yaml",
        "./lib/systemd/system/edge-agent.service",
        "./usr/bin/edge-agent",
        "./opt/edge-agent/venv/bin/edge-agent",
        "./usr/share/doc/edge-agent/copyright",
        "./usr/share/doc/edge-agent/daemon.md",
        "./usr/share/lintian/overrides/edge-agent",
    ):
        assert expected in names, expected
    # the state dir is made by postinst so dpkg never owns (or removes) the data in it
    assert not any(n.startswith("./var/lib/edge-agent") for n in names)


def test_unpacked_tree(deb_tree: Path) -> None:
    assert (deb_tree / "DEBIAN" / "conffiles").read_text().split() == ["/etc/edge-agent/agent.yaml"]
    assert os.readlink(deb_tree / "usr/bin/edge-agent") == "/opt/edge-agent/venv/bin/edge-agent"
    # the venv links to the target's system python, not to the build host's
    python_link = os.readlink(deb_tree / "opt/edge-agent/venv/bin/python")
    assert python_link.startswith("/usr/bin/python3") or python_link.startswith("python3")
    script = (deb_tree / "opt/edge-agent/venv/bin/edge-agent").read_text()
    assert script.startswith("#!/opt/edge-agent/venv/bin/python")
    assert (deb_tree / "lib/systemd/system/edge-agent.service").read_bytes() == UNIT.read_bytes()
    # the shipped config is the commented default and loads to the defaults
    cfg_text = (deb_tree / "etc/edge-agent/agent.yaml").read_text()
    assert cfg_text.startswith("# edge-agent configuration")
    assert load_config(deb_tree / "etc/edge-agent/agent.yaml") == AgentConfig()


def test_no_build_paths_left_in_the_venv(deb_tree: Path) -> None:
    venv = deb_tree / "opt/edge-agent/venv"
    leaked = []
    for path in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            text = path.read_bytes()
            if b"/tmp/" in text or b"/stage/" in text:
                leaked.append(path.name)
    assert leaked == []
    pyc = next(venv.glob("lib/python3*/site-packages/agent/__pycache__/doctor.*.pyc"))
    assert b"/opt/edge-agent/venv/lib/" in pyc.read_bytes()


def test_agent_imports_from_the_unpacked_venv(deb_tree: Path) -> None:
    python = deb_tree / "opt/edge-agent/venv/bin/python"
    done = run([str(python), "-c", "import agent, sys; print(agent.__version__, sys.prefix)"])
    assert done.returncode == 0, done.stderr
    version, prefix = done.stdout.split()
    assert version == agent.__version__
    assert prefix == str(deb_tree / "opt/edge-agent/venv")


def test_maintainer_scripts_are_posix_sh(deb_tree: Path) -> None:
    for name in ("postinst", "prerm", "postrm"):
        script = deb_tree / "DEBIAN" / name
        assert script.read_text().startswith("#!/bin/sh\n")
        assert stat.S_IMODE(script.stat().st_mode) == 0o755
        done = run(["sh", "-n", str(script)])
        assert done.returncode == 0, f"{name}: {done.stderr}"
        if shutil.which("dash"):
            assert run(["dash", "-n", str(script)]).returncode == 0
        if shutil.which("shellcheck"):
            lint = run(["shellcheck", "-s", "sh", str(script)])
            assert lint.returncode == 0, lint.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_verifies_with_the_shipped_binary(deb_tree: Path, tmp_path: Path) -> None:
    shipped = (deb_tree / "lib/systemd/system/edge-agent.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", shipped, re.M)
    assert exec_start is not None
    # ExecStart names a file the package ships (the /usr/bin symlink into the venv)
    binary = exec_start.group(1)
    target = os.readlink(deb_tree / binary.lstrip("/"))
    assert (deb_tree / target.lstrip("/")).is_file()
    # verify against this host's systemd with ExecStart pointed at the unpacked copy (a
    # --root=tree verify would lack sysinit.target and /bin/kill)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(
        shipped.replace(f"ExecStart={binary}", f"ExecStart={deb_tree / target.lstrip('/')}")
    )
    done = run(["systemd-analyze", "verify", str(unit)])
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_has_no_errors(fast_deb: Path) -> None:
    done = run(["lintian", "--tag-display-limit", "0", str(fast_deb)])
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    if tags:
        print("lintian:\n" + "\n".join(tags))
    assert [t for t in tags if t.startswith("E: ")] == []


def test_build_refuses_bad_input(tmp_path: Path) -> None:
    done = run(["sh", str(BUILD_SH), "--wheel", str(tmp_path / "nope.whl")])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ")
    done = run(["sh", str(BUILD_SH), "--frobnicate"])
    assert done.returncode == 2
    assert "Error: unknown option --frobnicate" in done.stderr
    done = run(["sh", str(BUILD_SH), "--help"])
    assert done.returncode == 0 and "Example:" in done.stdout


def test_guides_shipped_where_the_unit_points(deb_tree: Path) -> None:
    unit = (deb_tree / "lib/systemd/system/edge-agent.service").read_text()
    links = re.findall(r"^Documentation=(.+)$", unit, re.M)
    assert links, "the unit names its documentation"
    for url in " ".join(links).split():
        assert url.startswith("file:///"), url
        shipped = deb_tree / url.removeprefix("file:///")
        assert shipped.is_file(), url
    doc = deb_tree / "usr/share/doc/edge-agent"
    # every guide in docs/ (not the internal CONTRACTS.md), byte for byte, world-readable
    guides = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "CONTRACTS.md")
    assert {"daemon.md", "install.md", "raspberry-pi.md", "jetson.md", "x86.md"} <= set(guides)
    for name in guides:
        assert (doc / name).read_bytes() == (REPO / "docs" / name).read_bytes(), name
        assert stat.S_IMODE((doc / name).stat().st_mode) == 0o644
    assert not (doc / "CONTRACTS.md").exists()
    assert (doc / "README.md").read_bytes() == (REPO / "README.md").read_bytes()
    assert (doc / "examples/agent.yaml").is_file()
