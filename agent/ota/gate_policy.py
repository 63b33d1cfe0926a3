"""Gate thresholds: the device policy gives them, a package may only tighten them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import from_mapping, load_yaml_file
from agent.errors import ConfigError


@dataclass(frozen=True)
class GatePolicy:
    """Guard rails of DESIGN §7; defaults are the device's when policy.yaml leaves a key out."""

    accuracy_drop_max_pp: float = 0.3
    f1_drop_max_pp: float = 0.5
    ece_increase_max: float = 0.02
    agreement_min: float = 0.98
    prob_mse_max: float = 0.001
    logit_cosine_min: float = 0.999
    class_recall_drop_max_pp: float = 2.0
    latency_p95_ratio_max: float = 1.2
    latency_p95_slack_ms: float = 0.5
    memory_added_max_mb: float = 256.0
    map_drop_max_pp: float = 0.5
    miou_drop_max_pp: float = 0.5
    # The gate's child process (agent.ota.gate_process): killed after this many seconds of
    # wall clock, and its address space capped at this many MB. Sized for a Raspberry Pi
    # running the golden set of a small model; a package may lower both, never raise them.
    gate_timeout_s: float = 300.0
    gate_memory_max_mb: float = 1024.0
    # detection: mAP@0.5:0.95 (COCO's average over 10 IoU thresholds) and AP@0.5 per class
    map50_95_drop_max_pp: float = 1.0
    class_ap_drop_max_pp: float = 5.0

    def check(self) -> str | None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                return f"{f.name}: must be a finite number >= 0, got {value}"
        if self.agreement_min > 1:
            return f"agreement_min: must be at most 1, got {self.agreement_min}"
        if self.logit_cosine_min > 1:
            return f"logit_cosine_min: must be at most 1, got {self.logit_cosine_min}"
        if self.latency_p95_ratio_max <= 0:
            return "latency_p95_ratio_max: must be above 0"
        for name in ("gate_timeout_s", "gate_memory_max_mb"):
            if getattr(self, name) <= 0:
                return f"{name}: must be above 0"
        return None

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


# Raising these makes the gate stricter; every other threshold is tightened by lowering it.
RAISE_TO_TIGHTEN = frozenset({"agreement_min", "logit_cosine_min"})
THRESHOLD_NAMES = tuple(f.name for f in dataclasses.fields(GatePolicy))


@dataclass(frozen=True)
class PolicyChange:
    """One key of a package's ``gate``: applied (tighter or equal) or ignored, and why."""

    key: str
    requested: Any
    device_value: float | None
    applied: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_POLICY_CACHE: dict[tuple[str, int, int], GatePolicy] = {}
# policy.yaml sections that other parts of the agent read (not gate thresholds): drift
# (the telemetry summaries, agent/telemetry/drift.py) and shadow (probation,
# agent/ota/shadow.py)
POLICY_SECTIONS = frozenset({"drift", "shadow"})


def _thresholds_only(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k not in POLICY_SECTIONS}
    return data


def load_policy_section(path: Path, name: str) -> Any:
    """One section of a policy.yaml (None when the file or the section is absent)."""
    if not path.is_file():
        return None
    data = load_yaml_file(path)
    return data.get(name) if isinstance(data, dict) else None


def load_policy(path: Path) -> GatePolicy:
    """Read a policy.yaml; an unknown key or a bad value is a ConfigError naming it.

    Parsed once per file version (path, size, mtime): the OTA client gates often and the
    pure-Python YAML parser is the slowest step of a small gate."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _POLICY_CACHE:
        return _POLICY_CACHE[key]
    policy = from_mapping(GatePolicy, _thresholds_only(load_yaml_file(path)), source=str(path))
    if key is not None:
        _POLICY_CACHE[key] = policy
    return policy


def policy_from_mapping(data: Mapping[str, Any] | None, source: str = "<policy>") -> GatePolicy:
    plain = _thresholds_only(dict(data)) if data is not None else None
    return from_mapping(GatePolicy, plain, source=source)


def is_tighter_or_equal(key: str, device_value: float, requested: float) -> bool:
    if key in RAISE_TO_TIGHTEN:
        return requested >= device_value
    return requested <= device_value


def apply_package_gate(
    policy: GatePolicy, package_gate: Mapping[str, Any] | None
) -> tuple[GatePolicy, list[PolicyChange]]:
    """Tighten ``policy`` with a package's ``gate``; a loosening, unknown or malformed key is
    ignored (the device keeps its value) and listed, so the report shows the attempt."""
    if not package_gate:
        return policy, []
    changes: list[PolicyChange] = []
    updates: dict[str, float] = {}
    for key, requested in package_gate.items():
        device_value = float(getattr(policy, key)) if key in THRESHOLD_NAMES else None
        if device_value is None:
            changes.append(PolicyChange(str(key), requested, None, False, "unknown threshold"))
            continue
        if (
            isinstance(requested, bool)
            or not isinstance(requested, (int, float))
            or not math.isfinite(requested)
        ):
            changes.append(PolicyChange(key, requested, device_value, False, "not a finite number"))
            continue
        if is_tighter_or_equal(key, device_value, float(requested)):
            updates[key] = float(requested)
            changes.append(PolicyChange(key, requested, device_value, True, "tightened"))
        else:
            changes.append(
                PolicyChange(
                    key,
                    requested,
                    device_value,
                    False,
                    "would loosen the device policy; a package may only tighten",
                )
            )
    try:
        tightened = dataclasses.replace(policy, **updates)
    except (TypeError, ValueError) as exc:  # pragma: no cover - values checked above
        raise ConfigError(f"package gate: {exc}") from None
    problem = tightened.check()
    if problem:
        # A tighter value can still be out of range (agreement_min 1.5); keep the device's.
        bad = problem.split(":", 1)[0]
        changes = [
            dataclasses.replace(c, applied=False, reason=problem) if c.key == bad else c
            for c in changes
        ]
        updates.pop(bad, None)
        tightened = dataclasses.replace(policy, **updates)
    return tightened, changes


def resolve_policy(
    policy: GatePolicy | Mapping[str, Any] | Path | str | None, golden_dir: Path
) -> GatePolicy:
    """The device policy: given, read from a file, or ``golden_dir/policy.yaml``, else the
    built-in defaults."""
    if isinstance(policy, GatePolicy):
        return policy
    if isinstance(policy, Mapping):
        return policy_from_mapping(policy)
    if policy is not None:
        return load_policy(Path(policy))
    default = golden_dir / "policy.yaml"
    return load_policy(default) if default.is_file() else GatePolicy()
