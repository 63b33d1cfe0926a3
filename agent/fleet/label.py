"""How a rollout's state and stage read to people: one wording for the CLI and the pages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def rollout_state_word(st: Mapping[str, Any]) -> str:
    """aborted, complete, paused or running, from a rollout status (or state) mapping."""
    if st["aborted"]:
        return "aborted"
    if st["completed"]:
        return "complete"
    return "paused" if st["paused"] else "running"


def stage_label(stage: int, stages: int) -> str:
    """The stage as people count it: index 1 of 3 stages reads "2/3"."""
    return f"{stage + 1}/{stages}"
