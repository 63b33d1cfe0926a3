"""The full .deb installed with apt into a clean debootstrap root; EDGE_AGENT_SLOW=1, root only."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .conftest import REPO, SLOW, needs_dpkg, needs_system_python, run

CHROOT_SH = REPO / "packaging" / "deb" / "test_in_chroot.sh"

pytestmark = [needs_dpkg, needs_system_python]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount need root")


@needs_root
@pytest.mark.slow
@pytest.mark.skipif(
    not SLOW, reason="debootstrap + apt from the Debian mirror (minutes); EDGE_AGENT_SLOW=1"
)
@pytest.mark.skipif(
    shutil.which("debootstrap") is None and not os.environ.get("EDGE_AGENT_CHROOT_BASE"),
    reason="apt install debootstrap, or set EDGE_AGENT_CHROOT_BASE to a debootstrap tree",
)
@pytest.mark.timeout(1200)
def test_apt_install_remove_purge_in_a_clean_debian_root(full_deb: Path) -> None:
    argv = ["sh", str(CHROOT_SH)]
    # a tree made earlier by `debootstrap --variant=minbase bookworm DIR` saves a minute
    base = os.environ.get("EDGE_AGENT_CHROOT_BASE")
    if base:
        argv += ["--base", base]
    done = run([*argv, str(full_deb)])
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = re.search(r"^chroot-test: (\d+) passed, 0 failed$", done.stdout, re.M)
    assert summary is not None and int(summary.group(1)) >= 30
    for step in (
        "system user edge-agent exists",
        "/var/lib/edge-agent edge-agent:edge-agent 0750",
        "the unit's Documentation= file is installed",
        "doctor: service user ok",
        "after remove: /var/lib/edge-agent kept with its data",
        "after purge: /var/lib/edge-agent gone",
    ):
        assert re.search(rf"^ok    {re.escape(step)}", done.stdout, re.M), step


@needs_root  # the root check comes before the checks of --base
def test_chroot_script_refuses_bad_input(tmp_path: Path) -> None:
    for argv, message in (
        ([], "Error: no .deb given"),
        ([str(tmp_path / "missing.deb")], "Error: "),
        (["--frobnicate"], "Error: unknown option --frobnicate"),
        (["--base", str(tmp_path), str(CHROOT_SH)], "not a Debian root"),
    ):
        done = run(["sh", str(CHROOT_SH), *argv])
        assert done.returncode == 2, (argv, done.stderr)
        assert message in done.stderr, (argv, done.stderr)
    done = run(["sh", str(CHROOT_SH), "--help"])
    assert done.returncode == 0 and "Example:" in done.stdout
