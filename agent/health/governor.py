"""The governor: lowers the FPS cap when hot, pauses when too hot, recovers with hysteresis."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import GovernorConfig
from agent.health.sensors import Readings, SensorReader

log = logging.getLogger(__name__)

EventSink = Callable[[str, Mapping[str, Any]], None]

NORMAL = "normal"
THROTTLED = "throttled"
PAUSED = "paused"
# psutil.cpu_percent counts every core together, 0-100
CPU_GUARD_SAMPLES = 3


@dataclass(frozen=True)
class Decision:
    """What the governor wants after one look at the sensors."""

    state: str
    fps_cap: float
    reason: str
    changed: bool
    temp_c: float | None


class Governor:
    """Decides the FPS cap from sensor readings; pure given the readings (no I/O here).

    - hottest zone >= hard limit: pause inference;
    - >= soft limit, firmware throttling now, CPU or memory guard tripped: cap x step_factor
      per tick, down to min_fps;
    - a paused agent resumes (at the lowest cap) once below hard - hysteresis;
    - below soft - hysteresis with no guard tripped: cap / step_factor per tick back up to
      the configured cap. Between the two thresholds the cap holds, so it does not oscillate.
    """

    def __init__(self, config: GovernorConfig, base_fps: float) -> None:
        self.config = config
        self.base_fps = base_fps
        self.fps_cap = base_fps
        self.state = NORMAL
        self.steps = 0
        self._cpu_high = 0

    def _floor(self) -> float:
        # an uncapped agent (0) is throttled from a nominal 30 FPS
        return min(self.config.min_fps, self.base_fps) if self.base_fps > 0 else self.config.min_fps

    def set_base(self, base_fps: float) -> None:
        """A config reload changed the configured cap."""
        self.base_fps = base_fps
        if self.state == NORMAL:
            self.fps_cap = base_fps

    def pressure(self, r: Readings) -> str | None:
        """Why the cap should go down now, or None."""
        c = self.config
        temp = r.max_temp_c
        if temp is not None and temp >= c.soft_limit_c:
            return f"temperature {temp:.1f} C >= soft limit {c.soft_limit_c:g} C"
        if r.throttle is not None:
            hot = [f for f in r.throttle.now if f in ("throttled", "soft_temp_limit")]
            if hot:
                return f"firmware reports {', '.join(hot)}"
        if r.cpu_percent is not None and r.cpu_percent >= c.max_cpu_percent:
            self._cpu_high += 1
            # one busy second is noise; a sustained one is a guard
            if self._cpu_high >= CPU_GUARD_SAMPLES:
                return f"CPU {r.cpu_percent:.0f}% >= {c.max_cpu_percent:g}%"
        else:
            self._cpu_high = 0
        if r.free_memory_mb is not None and r.free_memory_mb < c.min_free_memory_mb:
            return f"free memory {r.free_memory_mb:.0f} MB < {c.min_free_memory_mb:g} MB"
        return None

    def decide(self, r: Readings) -> Decision:
        c = self.config
        temp = r.max_temp_c
        old_state, old_cap = self.state, self.fps_cap
        reason = ""
        base = self.base_fps if self.base_fps > 0 else 30.0
        if temp is not None and temp >= c.hard_limit_c:
            self.state = PAUSED
            reason = f"temperature {temp:.1f} C >= hard limit {c.hard_limit_c:g} C"
        elif self.state == PAUSED and temp is not None and temp > c.hard_limit_c - c.hysteresis_c:
            reason = "still paused: waiting to cool below hard limit - hysteresis"
        else:
            if self.state == PAUSED:
                # resume at the lowest cap and climb back from there
                self.state = THROTTLED
                self.fps_cap = self._floor()
                reason = "cooled below hard limit - hysteresis: resuming at the lowest cap"
            why = self.pressure(r)
            cool = temp is None or temp < c.soft_limit_c - c.hysteresis_c
            if why is not None:
                current = self.fps_cap if self.fps_cap > 0 else base
                self.fps_cap = max(self._floor(), round(current * c.step_factor, 3))
                self.state = THROTTLED
                reason = why
            elif self.state == THROTTLED and cool:
                up = round(self.fps_cap / c.step_factor, 3)
                if up >= base:
                    self.state = NORMAL
                    self.fps_cap = self.base_fps
                    reason = "recovered: cap back to the configured value"
                else:
                    self.fps_cap = up
                    reason = "cooling: stepping the cap up"
        changed = self.state != old_state or self.fps_cap != old_cap
        if changed:
            self.steps += 1
        return Decision(self.state, self.fps_cap, reason, changed, temp)


class GovernorThread:
    """Reads the sensors every interval_s in its own thread and applies the governor's steps."""

    def __init__(
        self,
        config: GovernorConfig,
        base_fps: float,
        apply_cap: Callable[[float], None],
        on_event: EventSink | None = None,
        reader: SensorReader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.governor = Governor(config, base_fps)
        self.reader = reader or SensorReader(config)
        self._apply_cap = apply_cap
        self._on_event = on_event
        self._clock = clock
        self._stop = threading.Event()
        # a plain bool, not an Event: the frame loop reads it every frame (an Event's
        # is_set() is a Python-level call) and nothing waits on it
        self.paused = False
        self._lock = threading.Lock()
        self.readings = Readings()
        self.last_decision: Decision | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        return self.governor.state

    def tick(self) -> Decision:
        """One sensor sweep and decision (the thread calls this; tests may too)."""
        readings = self.reader.read()
        with self._lock:
            decision = self.governor.decide(readings)
            self.readings = readings
            self.last_decision = decision
        self.paused = decision.state == PAUSED
        if decision.changed:
            if decision.state != PAUSED:
                self._apply_cap(decision.fps_cap)
            level = logging.INFO if decision.state == NORMAL else logging.WARNING
            log.log(
                level,
                "governor: %s, fps cap %g (%s)",
                decision.state,
                decision.fps_cap,
                decision.reason,
            )
            if self._on_event is not None:
                self._on_event(
                    "governor.step",
                    {
                        "state": decision.state,
                        "fps_cap": decision.fps_cap,
                        "reason": decision.reason,
                        "temp_c": decision.temp_c,
                    },
                )
        return decision

    def start(self) -> None:
        if not self.config.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="governor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the governor must outlive any sensor surprise
                log.exception("governor: tick failed; carrying on")
            self._stop.wait(self.config.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self.paused = False
        if self._thread is not None:
            self._thread.join(5.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": self.config.enabled,
                "state": self.governor.state,
                "fps_cap": self.governor.fps_cap,
                "reason": self.last_decision.reason if self.last_decision else "",
                "steps": self.governor.steps,
                "sensor_warnings": self.reader.warnings,
                **self.readings.to_dict(),
            }
