"""ModelHost: all OTA needs from whatever runs the model (the daemon, or a bare slot)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.pipeline.slot import ActiveModel, ModelSlot
from agent.pipeline.sources import Frame

# Called by the host's frame loop after each served batch: (the served model, its frames,
# its outputs, its latency in s, the FPS cap now); must never block (agent/ota/shadow_run.py)
ShadowFeed = Callable[[ActiveModel, Sequence[Frame], Sequence[Any], float, float], bool]


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

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        """Give each served batch to ``feed`` too (None: stop); False when the host runs no
        frame loop of its own (then there is nothing to shadow)."""


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

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        return False  # no frame loop here: nothing to shadow
