"""The probe before activation: a package whose preprocessing cannot take one frame of the
configured source is refused before any link moves."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.errors import ModelError
from agent.ota import install
from agent.ota.states import OTAState

from .conftest import Device, feed_frames


@dataclasses.dataclass(frozen=True)
class ProbeRow:
    """What the package's author controls: its manifest's preprocess section."""

    id: str
    preprocess: dict[str, Any]
    error: str


ROWS = [
    ProbeRow(
        "mean-for-three-channels",
        {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]},
        "preprocess.mean: has 3 values for 1 channels",
    ),
    ProbeRow("NHWC-for-an-NCHW-model", {"layout": "NHWC"}, "the model wants (1, 8, 8)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_package_that_cannot_take_a_frame_is_refused_before_any_link_moves(
    device: Device, row: ProbeRow
) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    links = install.read_links(device.state_dir)
    bad = device.package("1.1.0", 2, preprocess=row.preprocess)
    with pytest.raises(ModelError, match="probe frame") as caught:
        svc.install_file(bad)
    assert row.error in str(caught.value)
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.ROLLED_BACK, last
    assert "probe frame" in last.reason
    assert install.read_links(device.state_dir) == links
    assert not (device.state_dir / "models" / "digits-1.1.0").exists()
    assert svc.journal.refusal("digits", "1.1.0", "local") is not None
    svc.close()


def test_a_package_that_takes_the_frame_installs(device: Device) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    ok = device.package("1.1.0", 2, preprocess={"scale": 1 / 255})
    assert svc.install_file(ok).state is OTAState.PROBATION
    svc.close()
