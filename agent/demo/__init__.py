"""The demo models shipped with the agent (built by tools/build_demo_models.py)."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def demo_model(name: str) -> Path:
    """Path of a shipped demo model, e.g. ``demo_model("digits_int8.tflite")``."""
    return MODELS_DIR / name
