"""agent/ota/tuf_view.py: the one reach into python-tuf's internals works on the tuf installed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import tuf
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata
from tuf.ngclient.updater import Updater

from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo
from agent.ota.tuf_view import TESTED_TUF_MAJORS, set_reference_time, trusted_roles

from .fleet_testlib import provision_device, static_server

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_tuf_is_one_the_pin_allows_and_the_helper_was_tested_on() -> None:
    pin = re.search(r'"tuf>=(\d+)\.\d+,<(\d+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin tuf to a tested range (tuf>=X.Y,<Z)"
    low, high = int(pin.group(1)), int(pin.group(2))
    assert tuple(range(low, high)) == TESTED_TUF_MAJORS
    assert int(tuf.__version__.split(".")[0]) in TESTED_TUF_MAJORS


def updater_for(state_dir: Path, url: str) -> Updater:
    return Updater(
        metadata_dir=str(state_dir / "tuf"),
        metadata_base_url=f"{url}/metadata/",
        target_dir=str(state_dir / "staging"),
        target_base_url=f"{url}/targets/",
        bootstrap=None,
    )


@pytest.mark.parametrize(
    ("offset_s", "expired"),
    [(0.0, False), (-10 * 365 * 86400.0, False), (10 * 365 * 86400.0, True)],
    ids=["now", "ten-years-back", "ten-years-ahead"],
)
def test_reference_time_decides_expiry_and_the_roles_are_the_verified_ones(
    tmp_path: Path, operator_keys: list[OperatorKey], offset_s: float, expired: bool
) -> None:
    base = tmp_path / "repo"
    init_repo(base, operator_keys)
    state = tmp_path / "device"
    provision_device(state, base)
    (state / "staging").mkdir()
    with static_server(base) as url:
        updater = updater_for(state, url)
        set_reference_time(updater, time.time() + offset_s)
        if expired:
            with pytest.raises(tuf_exceptions.ExpiredMetadataError):
                updater.refresh()
            return
        updater.refresh()
    roles = trusted_roles(updater, delegated=("rollout", "no-such-role"))
    for name in ("timestamp", "snapshot", "targets"):
        # the copies the updater kept once verified
        signed = Metadata.from_file(str(state / "tuf" / f"{name}.json")).signed
        assert roles.versions[name] == signed.version
        assert roles.expires_s[name] == signed.expires.timestamp()
    assert roles.versions["root"] == 1
    assert "no-such-role" not in roles.expires_s
    assert roles.consistent_snapshot is True  # what `repo init` writes
