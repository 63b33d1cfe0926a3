"""Fixtures shared by every area's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import agent  # noqa: F401  (first: opts out of onnxruntime's telemetry before any test loads it)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO_ROOT / "agent" / "demo" / "models"

# tools/demo_models.py builds model variants (ONNX graphs from numpy weights) for tests.
if str(REPO_ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tools"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_models() -> Path:
    return DEMO_MODELS
