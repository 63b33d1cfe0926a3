"""Staged-rollout membership (a stable bucket per device and salt) and the jittered poll delay."""

from __future__ import annotations

import hashlib
import random

BUCKETS = 10000


def rollout_bucket(device_id: str, salt: str) -> int:
    """This device's bucket in 0..9999 for a release's salt; stable across percent changes."""
    digest = hashlib.sha256(f"{device_id}:{salt}".encode()).hexdigest()
    return int(digest[:8], 16) % BUCKETS


def in_rollout(device_id: str, salt: str, percent: float) -> bool:
    """True when the rollout at ``percent`` (0..100) includes this device."""
    return rollout_bucket(device_id, salt) < percent * 100


def poll_delay_s(interval_s: float, jitter_s: float, rng: random.Random | None = None) -> float:
    """The wait before the next channel check: interval plus uniform jitter (spreads a fleet)."""
    r = rng or random.Random()
    return max(1.0, interval_s + r.uniform(-jitter_s, jitter_s))
