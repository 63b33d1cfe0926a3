"""packaging/install.sh into a temp root: layout, idempotence, --uninstall and --purge."""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent.config import AgentConfig, load_config

from .conftest import INSTALL_SH, REPO, needs_system_python, run

pytestmark = needs_system_python


def install(root: Path, wheel: Path, *extra: str) -> str:
    done = run(
        ["sh", str(INSTALL_SH), "--root", str(root), "--wheel", str(wheel), "--no-deps", *extra]
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_install_layout_reinstall_and_uninstall(tmp_path: Path, agent_wheel: Path) -> None:
    root = tmp_path / "root"
    log = install(root, agent_wheel)
    assert "skipped creating the edge-agent user" in log
    venv = root / "opt/edge-agent/venv"
    done = run([str(venv / "bin/python"), "-c", "import agent; print(agent.__version__)"])
    assert done.returncode == 0, done.stderr
    assert (venv / "bin/edge-agent").read_text().startswith("#!/opt/edge-agent/venv/bin/python")
    assert os.readlink(root / "usr/local/bin/edge-agent") == "/opt/edge-agent/venv/bin/edge-agent"
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert re.search(r"^ExecStart=/opt/edge-agent/venv/bin/edge-agent run ", unit, re.M)
    # the only changes: the command in the venv, the guides under /usr/local
    assert (
        unit.replace("/opt/edge-agent/venv/bin/edge-agent", "/usr/bin/edge-agent").replace(
            "/usr/local/share/doc/edge-agent/", "/usr/share/doc/edge-agent/"
        )
        == (REPO / "systemd/edge-agent.service").read_text()
    )
    doc_url = re.search(r"^Documentation=file://(\S+)$", unit, re.M)
    assert doc_url is not None and doc_url.group(1).startswith("/usr/local/share/doc/edge-agent/")
    assert (root / doc_url.group(1).lstrip("/")).is_file()
    docs = root / "usr/local/share/doc/edge-agent"
    assert (docs / "install.md").read_bytes() == (REPO / "docs/install.md").read_bytes()
    assert not (docs / "CONTRACTS.md").exists()
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert wants.is_symlink()
    config = root / "etc/edge-agent/agent.yaml"
    assert load_config(config) == AgentConfig()
    assert (root / "var/lib/edge-agent").is_dir()

    # again, with an admin's edit in the config: same tree, the edit kept
    config.write_text("log_level: DEBUG\n")
    (root / "var/lib/edge-agent/state.db").write_bytes(b"journal")
    (docs / "old-guide.md").write_text("from an older release")
    log = install(root, agent_wheel)
    assert "kept the existing" in log
    assert not (docs / "old-guide.md").exists() and (docs / "daemon.md").is_file()
    assert config.read_text() == "log_level: DEBUG\n"
    assert wants.is_symlink() and (venv / "bin/edge-agent").is_file()

    done = run(["sh", str(INSTALL_SH), "--root", str(root), "--uninstall"])
    assert done.returncode == 0, done.stderr
    assert not (root / "opt/edge-agent").exists()
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not wants.exists() and not wants.is_symlink()
    assert not (root / "usr/local/bin/edge-agent").is_symlink()
    assert not docs.exists()
    # remove keeps config and data
    assert config.read_text() == "log_level: DEBUG\n"
    assert (root / "var/lib/edge-agent/state.db").read_bytes() == b"journal"

    done = run(["sh", str(INSTALL_SH), "--root", str(root), "--uninstall", "--purge"])
    assert done.returncode == 0, done.stderr
    assert not (root / "var/lib/edge-agent").exists()
    assert not (root / "etc/edge-agent").exists()


def test_other_prefix_is_written_into_the_unit(tmp_path: Path, agent_wheel: Path) -> None:
    root = tmp_path / "root"
    install(root, agent_wheel, "--prefix", "/srv/ea", "--extras", "")
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/srv/ea/venv/bin/edge-agent run" in unit
    assert (root / "srv/ea/venv/bin/python").exists()


def test_bad_options(tmp_path: Path) -> None:
    for argv, message in (
        (["--frobnicate"], "Error: unknown option --frobnicate"),
        (["--purge"], "Error: --purge goes with --uninstall"),
        (["--prefix", "relative"], "Error: --prefix must be absolute"),
        (["--root", str(tmp_path), "--wheel", str(tmp_path / "x.whl")], "wheel not found"),
    ):
        done = run(["sh", str(INSTALL_SH), *argv])
        assert done.returncode == 2, argv
        assert message in done.stderr
    done = run(["sh", str(INSTALL_SH), "--help"])
    assert done.returncode == 0 and "Example:" in done.stdout
