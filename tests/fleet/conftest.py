"""Fleet test fixtures; the helpers live in fleet_testlib.py (importable by the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, so put this folder on sys.path for fleet_testlib.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_testlib import make_key_dir

from agent.fleet.keys import OperatorKey


@pytest.fixture()
def operator_keys(tmp_path: Path) -> list[OperatorKey]:
    return make_key_dir(tmp_path / "keys")


@pytest.fixture()
def release_keys(operator_keys: list[OperatorKey]) -> list[OperatorKey]:
    return [k for k in operator_keys if k.role == "release"]
