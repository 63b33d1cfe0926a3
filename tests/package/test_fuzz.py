"""A short, bounded atheris run of tools/fuzz_package.py (skipped where atheris is missing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fuzz_package.py"), "-runs=1500", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # libFuzzer writes crash-* files into the working directory
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 1500 runs" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
