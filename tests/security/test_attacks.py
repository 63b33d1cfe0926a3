"""The attack table (tests/security/attacks.py) played row by row: real repository, HTTP, keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from .attacks import ATTACKS, Attack, play


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack(attack: Attack, tmp_path: Path) -> None:
    outcome = play(attack, tmp_path)
    assert outcome.result == attack.expect, (
        f"{attack.name} (attacker holds {attack.attacker_holds}; {attack.does}): "
        f"{outcome.result} ({outcome.reason})"
    )
    assert attack.reason in outcome.reason, outcome.reason


def test_every_row_names_keys_action_and_outcome() -> None:
    names = [a.name for a in ATTACKS]
    assert len(set(names)) == len(names)
    for attack in ATTACKS:
        assert attack.attacker_holds and attack.does and attack.reason
        assert attack.expect in {"refused", "healed", "allowed", "retried", "clean", "rolled back"}
