"""Frame pacing: an FPS cap by deadlines (no drift, no burst after a stall, no busy wait)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class FrameScheduler:
    """Paces frames at ``fps_cap`` (0 = uncapped) with deadlines on an injected clock.

    Each frame's deadline is the previous deadline plus one period, so time spent in
    inference does not accumulate as drift (a `run(); sleep(1/fps)` loop runs slow by its
    inference time). When the loop falls behind by more than a period (a stall, a pause,
    a slow frame) the schedule restarts from now instead of bursting to catch up.
    """

    def __init__(
        self,
        fps_cap: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._fps_cap = float(fps_cap)
        self._next: float | None = None
        self.resyncs = 0
        self.late_frames = 0

    @property
    def fps_cap(self) -> float:
        return self._fps_cap

    def set_cap(self, fps_cap: float) -> None:
        """Change the cap; the new period applies from the next frame on (thread-safe)."""
        with self._lock:
            if fps_cap == self._fps_cap:
                return
            old_period = 1.0 / self._fps_cap if self._fps_cap > 0 else 0.0
            self._fps_cap = float(fps_cap)
            if self._next is not None:
                # re-anchor the pending deadline on the new period from the last frame
                last = self._next - old_period
                self._next = last + (1.0 / fps_cap if fps_cap > 0 else 0.0)

    def restart(self) -> None:
        """Forget the schedule (after a pause): the next frame starts a new one."""
        with self._lock:
            self._next = None

    def charge(self, extra_frames: int) -> None:
        """Push the next deadline back for a batch that held more than one frame."""
        with self._lock:
            if self._next is not None and self._fps_cap > 0 and extra_frames > 0:
                self._next += extra_frames / self._fps_cap

    def wait(self, frames: int = 1) -> float:
        """Sleep until the next deadline and return it; ``frames`` is the batch size to pay for."""
        with self._lock:
            cap = self._fps_cap
            now = self._clock()
            if cap <= 0:
                self._next = None
                return now
            period = 1.0 / cap
            if self._next is None:
                self._next = now
            elif now - self._next > period:
                self.resyncs += 1
                self._next = now
            elif now > self._next:
                self.late_frames += 1
            deadline = self._next
            self._next = deadline + period * max(1, frames)
        delay = deadline - now
        if delay > 0:
            self._sleep(delay)
        return deadline
