"""What a release's gate measured that outlives it: drift baseline, margin, drift arming."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from agent.ota.context import ServiceContext

log = logging.getLogger(__name__)

# journal values "gate_quality:<name>-<version>": the golden histograms and gate margin
GATE_QUALITY_PREFIX = "gate_quality:"


class ReleaseQuality(ServiceContext):
    """The gate's lasting figures per release, and the drift they arm in telemetry."""

    def _keep_gate_quality(self, name: str, version: str, report: Mapping[str, Any]) -> None:
        """Store what the gate measured that outlives the gate report (the next gate
        overwrites that): the golden-set histograms drift is measured against once this
        release is live, and the gate's smallest margin, keyed by release."""
        metrics = report.get("metrics")
        baseline = metrics.get("drift_baseline") if isinstance(metrics, Mapping) else None
        margin = report.get("margin")
        kept: dict[str, Any] = {}
        if isinstance(baseline, Mapping):
            kept["baseline"] = dict(baseline)
        if isinstance(margin, Mapping) and isinstance(margin.get("value"), (int, float)):
            kept["gate_margin"] = float(margin["value"])
            kept["gate_margin_check"] = str(margin.get("check", ""))
        if kept:
            self.journal.set_value(f"{GATE_QUALITY_PREFIX}{name}-{version}", json.dumps(kept))

    def gate_quality(self, name: str, version: str) -> dict[str, Any]:
        """What _keep_gate_quality stored for a release ({} when it was never gated here)."""
        raw = self.journal.get_value(f"{GATE_QUALITY_PREFIX}{name}-{version}")
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def arm_drift(self) -> None:
        """Tell telemetry the live model's golden-set baseline and the drift policy, so each
        summary carries its drift (agent/telemetry/drift.py); never raises."""
        arm = getattr(self.recorder, "set_drift_baseline", None)
        manifest = self.current_manifest()
        if arm is None or manifest is None:
            return
        from agent.telemetry.drift import DriftPolicy, GoldenBaseline, load_drift_policy

        name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
        stored = self.gate_quality(name, version).get("baseline")
        baseline = GoldenBaseline.from_dict(stored) if isinstance(stored, Mapping) else None
        policy = DriftPolicy()
        golden_dir = self.config.ota.golden_dir
        try:
            if golden_dir is not None:
                policy = load_drift_policy(golden_dir / "policy.yaml")
            arm(name, version, baseline, policy)
        except Exception as exc:  # drift is telemetry: it must never stop an update
            log.warning("drift: not armed for %s %s: %s", name, version, exc)

    def _quality_at_commit(self, name: str, version: str) -> dict[str, float]:
        """The COMMITTED row's ``quality`` figures this part knows: the gate's margin and
        the live model's drift from its golden baseline since it went live."""
        quality: dict[str, float] = {}
        margin = self.gate_quality(name, version).get("gate_margin")
        if isinstance(margin, (int, float)):
            quality["gate_margin"] = float(margin)
        since_live = getattr(self.recorder, "drift_since_live", None)
        if since_live is not None:
            try:
                figures = since_live(name, version)
            except Exception as exc:  # telemetry must never stop a commit
                log.warning("drift: not read at commit: %s", exc)
                figures = None
            if figures is not None:
                quality["drift_psi"] = round(float(figures.class_psi), 6)
        return quality
