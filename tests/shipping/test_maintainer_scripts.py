"""The .deb's maintainer scripts run with fake system commands on PATH that record each call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import needs_dpkg, needs_system_python, run

pytestmark = [needs_dpkg, needs_system_python]

# Every command the scripts may call; each appends its argv to calls.log. getent answers
# from FAKE_USERS / FAKE_GROUPS so a test picks what exists on the "system".
FAKES = ("adduser", "install", "chown", "chmod", "rm", "rmdir", "systemctl",
         "deb-systemd-helper", "deb-systemd-invoke")  # fmt: skip


@pytest.fixture
def fake_path(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in FAKES:
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\nexit 0\n')
        script.chmod(0o755)
    getent = bin_dir / "getent"
    getent.write_text(
        '#!/bin/sh\necho "getent $*" >> "$CALLS"\n'
        'case "$1" in passwd) list=$FAKE_USERS ;; group) list=$FAKE_GROUPS ;; esac\n'
        'for n in $list; do [ "$n" = "$2" ] && { echo "$2:x:1:1::/:/bin/false"; exit 0; }; done\n'
        "exit 2\n"
    )
    getent.chmod(0o755)
    return bin_dir


def run_script(
    deb_tree: Path, fake_path: Path, tmp_path: Path, name: str, *args: str,
    users: str = "", groups: str = "video",
) -> list[str]:  # fmt: skip
    calls = tmp_path / "calls.log"
    calls.write_text("")
    env = {
        # only the fakes and the shell's own tools: nothing reaches the real system
        "PATH": f"{fake_path}:/usr/bin:/bin",
        "CALLS": str(calls),
        "FAKE_USERS": users,
        "FAKE_GROUPS": groups,
        # the state dir's existence is read from here, not from this machine's /var/lib
        "DPKG_ROOT": str(tmp_path / "root"),
    }
    done = run(["sh", str(deb_tree / "DEBIAN" / name), *args], env_extra=env)
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines()


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd runs here")
def test_first_configure_without_systemd(deb_tree: Path, fake_path: Path, tmp_path: Path) -> None:
    calls = run_script(deb_tree, fake_path, tmp_path, "postinst", "configure", "",
                       groups="video i2c")  # fmt: skip
    assert any(
        c.startswith("adduser --system --group --quiet --home /var/lib/edge-agent") for c in calls
    )
    assert "adduser --quiet edge-agent video" in calls
    assert "adduser --quiet edge-agent i2c" in calls
    assert not any(c.startswith("adduser --quiet edge-agent gpio") for c in calls)
    state_dir = tmp_path / "root" / "var/lib/edge-agent"
    assert f"install -d -o edge-agent -g edge-agent -m 0750 {state_dir}" in calls
    assert "chown root:edge-agent /etc/edge-agent/agent.yaml" in calls
    assert "deb-systemd-helper enable edge-agent.service" in calls
    # a chroot / image build: enabled, but nothing started and systemctl never called
    assert not any(c.startswith(("deb-systemd-invoke", "systemctl")) for c in calls)


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd runs here")
def test_upgrade_keeps_user_and_config_mode(
    deb_tree: Path, fake_path: Path, tmp_path: Path
) -> None:
    calls = run_script(deb_tree, fake_path, tmp_path, "postinst", "configure", "0.0.9",
                       users="edge-agent")  # fmt: skip
    assert not any(c.startswith("adduser --system") for c in calls)
    assert not any("/etc/edge-agent/agent.yaml" in c for c in calls)


def test_prerm_and_postrm(deb_tree: Path, fake_path: Path, tmp_path: Path) -> None:
    calls = run_script(deb_tree, fake_path, tmp_path, "prerm", "upgrade", "0.2.0")
    assert not any(c.startswith("deb-systemd-invoke stop") for c in calls)
    calls = run_script(deb_tree, fake_path, tmp_path, "postrm", "remove")
    assert "deb-systemd-helper mask edge-agent.service" in calls
    assert not any(c.startswith("rm ") for c in calls)  # remove keeps the state dir
    calls = run_script(deb_tree, fake_path, tmp_path, "postrm", "purge")
    assert "deb-systemd-helper purge edge-agent.service" in calls
    assert "rm -rf /var/lib/edge-agent" in calls


def test_unknown_action_fails(deb_tree: Path, fake_path: Path, tmp_path: Path) -> None:
    env = {"PATH": f"{fake_path}:/usr/bin:/bin", "CALLS": str(tmp_path / "c")}
    for name in ("postinst", "postrm"):
        done = run(["sh", str(deb_tree / "DEBIAN" / name), "bogus"], env_extra=env)
        assert done.returncode == 1 and "unknown argument" in done.stderr
