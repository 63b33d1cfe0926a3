"""Policy precedence: the device policy gives defaults, a package may only tighten them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.ota.gate_policy import GatePolicy, apply_package_gate, load_policy


def test_shipped_policy_is_the_design_defaults(golden_dir: Path):
    assert load_policy(golden_dir / "policy.yaml") == GatePolicy()


def test_tightening_applies_and_loosening_is_ignored_and_reported():
    policy, changes = apply_package_gate(
        GatePolicy(),
        {
            "accuracy_drop_max_pp": 0.2,  # tighter: lower
            "agreement_min": 0.99,  # tighter: higher
            "latency_p95_slack_ms": 2.0,  # looser: ignored
            "logit_cosine_min": 0.9,  # looser: ignored
            "ece_increase_max": 0.02,  # equal: fine
        },
    )
    assert policy.accuracy_drop_max_pp == 0.2
    assert policy.agreement_min == 0.99
    assert policy.latency_p95_slack_ms == 0.5
    assert policy.logit_cosine_min == 0.999
    ignored = {c.key: c.reason for c in changes if not c.applied}
    assert set(ignored) == {"latency_p95_slack_ms", "logit_cosine_min"}
    assert all("only tighten" in reason for reason in ignored.values())


def test_unknown_malformed_and_out_of_range_package_keys_are_ignored():
    policy, changes = apply_package_gate(
        GatePolicy(),
        {"future_threshold": 1, "f1_drop_max_pp": "0.1", "agreement_min": 1.5},
    )
    assert policy == GatePolicy()
    reasons = {c.key: c.reason for c in changes}
    assert reasons["future_threshold"] == "unknown threshold"
    assert reasons["f1_drop_max_pp"] == "not a finite number"
    assert "at most 1" in reasons["agreement_min"]


def test_device_policy_with_an_unknown_key_is_a_config_error(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text("accuracy_drop_max_pp: 0.3\naccuracy_drop_pp: 1\n")
    with pytest.raises(ConfigError, match="accuracy_drop_pp: unknown key"):
        load_policy(path)
    path.write_text("agreement_min: -1\n")
    with pytest.raises(ConfigError, match="agreement_min"):
        load_policy(path)
