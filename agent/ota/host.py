"""ModelHost: all OTA needs from whatever runs the model (the daemon, or a bare slot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.config import AgentConfig
from agent.pipeline.slot import ActiveModel, ModelSlot
from agent.pipeline.sources import Frame


@dataclass(frozen=True)
class LiveLatency:
    """The running model's latency in the host's own loop, over its frames since it went live."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    samples: int = 0


class ModelHost(Protocol):
    """What OTA calls on a running agent; agent/ota/ never imports the daemon itself.

    ``config`` is the running config (a reload's new backend options apply to the next
    install or rollback too).
    """

    @property
    def config(self) -> AgentConfig: ...

    def swap_in(self, model: ActiveModel) -> None:
        """Make ``model`` (loaded and warm) the live one between two frames; the host
        closes the model it replaces once no frame uses it."""

    def live_latency(self) -> LiveLatency:
        """The live model's latency over the frames it ran since it was swapped in."""

    def recent_frame(self) -> Frame | None:
        """The last frame the host's loop read (the probe's witness), None before any."""


@dataclass
class SlotHost:
    """A ModelHost over a bare ModelSlot (tools and tests that run frames themselves)."""

    slot: ModelSlot
    config: AgentConfig

    def swap_in(self, model: ActiveModel) -> None:
        # The frame that read the old model may still be running on it, so its backend
        # is left to the garbage collector rather than closed here.
        self.slot.swap(model)

    def live_latency(self) -> LiveLatency:
        return LiveLatency()

    def recent_frame(self) -> Frame | None:
        return None
