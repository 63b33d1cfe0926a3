"""packaging/deb/build.sh reports each step on stderr, nothing with -q; stdout stays the path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import BUILD_SH, needs_dpkg, needs_system_python, run


@needs_dpkg
@needs_system_python
@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_deb_build_shows_its_steps(tmp_path: Path, agent_wheel: Path, quiet: bool) -> None:
    argv = ["sh", str(BUILD_SH), "--no-deps", "--wheel", str(agent_wheel), "--out", str(tmp_path)]
    done = run([*argv, "-q"] if quiet else argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(".deb") and len(done.stdout.splitlines()) == 1
    steps = re.findall(r"^deb: \[(\d)/5\] (\d+)% ", done.stderr, re.MULTILINE)
    if quiet:
        assert steps == [] and "deb: 100% done" not in done.stderr
        return
    assert [int(n) for n, _ in steps] == [1, 2, 3, 4, 5]
    assert [int(p) for _, p in steps] == [0, 20, 40, 60, 80]
    assert re.search(r"^deb: 100% done: \d+ kB in \d+ s$", done.stderr, re.MULTILINE)
    assert re.search(r"\[5/5\] 80% compressing \d+ MB with gzip", done.stderr)
