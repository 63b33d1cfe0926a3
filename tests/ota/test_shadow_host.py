"""A ModelHost other than the daemon that feeds the shadow (as the fleet bench's devices do)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.ota.gate_process import GateOutcome
from agent.ota.host import ShadowFeed, SlotHost
from agent.ota.service import OTAService
from agent.ota.states import OTAState
from agent.pipeline.postprocess import top_k_rows
from agent.pipeline.preprocess import Preprocessor
from agent.pipeline.slot import ModelSlot
from agent.pipeline.sources import SyntheticSource

from .conftest import DEMO, feed_frames, make_device
from .test_shadow import PRE, loosen_golden_gate, relabelled


@dataclasses.dataclass
class FeedingHost(SlotHost):
    """A SlotHost whose caller runs the frames and hands each served one to the feed."""

    feed: ShadowFeed | None = None
    feeds_set: int = 0

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        self.feed = feed
        self.feeds_set += feed is not None
        return True


def passing_gate(_baseline: Path, _candidate: Path, _manifest: Any) -> GateOutcome:
    return GateOutcome(True, {"note": "the shadow is what this test is about"}, "passed")


@dataclasses.dataclass(frozen=True)
class HostRow:
    """The candidate controls its model bytes; the host's frame loop is the test's."""

    id: str
    model: Callable[[], bytes]
    end: OTAState
    reason_has: str
    agreement: float


HOST_ROWS = [
    HostRow(
        "agrees",
        lambda: (DEMO / "digits_fp32.onnx").read_bytes(),
        OTAState.COMMITTED,
        "shadow check passed",
        1.0,
    ),
    HostRow(
        "disagrees-on-every-frame",
        lambda: relabelled({c: (c + 1) % 10 for c in range(10)}),
        OTAState.ROLLED_BACK,
        "shadow check failed: top-1 agreement 0.000",
        0.0,
    ),
]


def serve_until_at_rest(service: OTAService, host: FeedingHost, timeout_s: float) -> int:
    """The host's frame loop: each frame through the live model, then to probation, then
    to the shadow feed (Daemon.loop's order); returns how many frames the feed took."""
    source = SyntheticSource((8, 8), "digits", seed=3)
    taken = 0
    deadline = time.monotonic() + timeout_s
    while service.journal.state() is OTAState.PROBATION:
        assert time.monotonic() < deadline, "probation did not end"
        frame = source.read(0.0)
        assert frame is not None
        model = host.slot.current()
        x = Preprocessor(model.preprocess, model.backend.inputs[0]).batch([frame])
        started = time.perf_counter()
        outputs = model.backend.run(x)
        latency_s = time.perf_counter() - started
        score = float(top_k_rows(outputs[0], 1, model.labels)[0][0]["score"])
        service.observe_frame(latency_s, score)
        feed = host.feed
        if feed is not None:
            taken += feed(model, [frame], outputs, latency_s, 0.0)
        # a camera's frame period: the shadow worker gets a core between frames
        time.sleep(0.002)
    return taken


@pytest.mark.parametrize("row", HOST_ROWS, ids=[r.id for r in HOST_ROWS])
def test_a_host_that_feeds_the_shadow_gets_the_candidate_judged_on_live_frames(
    row: HostRow, tmp_path: Path
) -> None:
    dev = make_device(tmp_path)
    loosen_golden_gate(dev)  # shadow: every frame sampled, min_frames 30
    first = dev.service()
    first.install_file(dev.package("1.0.0", 1, preprocess=PRE))
    feed_frames(first, 20)
    assert first.journal.state() is OTAState.COMMITTED
    first.close()

    slot = ModelSlot()
    host = FeedingHost(slot, dev.config)
    service = OTAService(dev.config, slot=slot, host=host)
    service.gate = passing_gate
    try:
        entry = service.install_file(dev.package("1.1.0", 2, row.model(), preprocess=PRE))
        assert entry.state is OTAState.PROBATION
        assert host.feed is not None and host.feeds_set == 1
        taken = serve_until_at_rest(service, host, timeout_s=300.0)
        last = service.journal.last()
        assert last is not None
        assert last.state is row.end and row.reason_has in last.reason, last.reason
        quality = last.detail["quality"]
        assert quality["shadow_agreement"] == pytest.approx(row.agreement)
        assert 30 <= quality["shadow_frames"] <= taken
        assert "confidence_delta" in quality and "class_hist_distance" in quality
        # the verdict stopped the shadow: the feed was taken back from the host
        assert host.feed is None
        expected_live = "1.1.0" if row.end is OTAState.COMMITTED else "1.0.0"
        assert slot.current().version == expected_live
    finally:
        service.close()
    deadline = time.monotonic() + 60.0
    while any(t.name == "ota-shadow" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a shadow worker thread did not end"
        time.sleep(0.05)
