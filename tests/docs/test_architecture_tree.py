"""docs/ARCHITECTURE.md's module tree is the code's: every module, one line each, as it is now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import module_tree  # noqa: E402


def test_the_architecture_page_lists_every_module_as_it_is() -> None:
    done = subprocess.run(
        [sys.executable, "tools/module_tree.py", "--check", "docs/ARCHITECTURE.md"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_new_or_redescribed_module_makes_the_tree_stale(tmp_path: Path) -> None:
    pkg = tmp_path / "agent"
    (pkg / "ota").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The agent."""\n')
    (pkg / "ota" / "__init__.py").write_text('"""OTA."""\n')
    (pkg / "ota" / "poll.py").write_text('"""The poll loop."""\n')
    before = module_tree.block(pkg)
    assert "poll.py" in before and "The poll loop." in before
    (pkg / "ota" / "decide.py").write_text('"""Check and decide."""\n')
    assert module_tree.block(pkg) != before
    (pkg / "ota" / "decide.py").unlink()
    (pkg / "ota" / "poll.py").write_text('"""The poll loop, now with jitter."""\n')
    assert module_tree.block(pkg) != before
