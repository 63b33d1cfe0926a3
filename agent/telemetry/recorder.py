"""TelemetryRecorder: what the daemon calls; never blocks, one writer thread does the I/O."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.config import TelemetryConfig
from agent.telemetry.clock import CheckedClock
from agent.telemetry.drift import DriftFigures, DriftMonitor, DriftPolicy, GoldenBaseline
from agent.telemetry.identity import read_boot_id
from agent.telemetry.ratelimit import warn_every
from agent.telemetry.sampler import IntervalSummary, is_sampled, mask_pii
from agent.telemetry.store import (
    CRITICAL_EVENT_PREFIXES,
    PRIORITY_CRITICAL,
    PRIORITY_NAMES,
    PRIORITY_SAMPLE,
    PRIORITY_SUMMARY,
    NewRecord,
    TelemetryStore,
    is_corrupt,
    is_locked,
)
from agent.telemetry.uploader import UploadLoop

log = logging.getLogger(__name__)

# Rows kept in memory while the database is locked or being replaced; samples go first.
MAX_PENDING_ROWS = 20000
# With no row to write, the writer still moves observations into the summary at least
# this often (and before the observation queue could fill at the last cycle's rate).
IDLE_WAIT_MAX_S = 5.0
# the writer repeats the same warning (locked, failing writes) at most once per this long
WARN_EVERY_S = 60.0
# store meta keys: the last summary's drift figures (status) and the model over the limit
DRIFT_LAST_META = "drift.last"
DRIFT_OVER_META = "drift.over"

# seq, latency_s, top_class, confidence, meta, sample (the record's other fields), wall, mono
_Observation = tuple[int, float, int, float, Any, Any, int, int]
_Event = tuple[str, dict[str, Any], int, int, int]


def event_priority(name: str, priority: str) -> int:
    level = PRIORITY_NAMES.get(priority)
    if level is None:
        log.warning("telemetry event %s: unknown priority %r, using 'event'", name, priority)
        level = PRIORITY_NAMES["event"]
    if name.startswith(CRITICAL_EVENT_PREFIXES):
        # OTA, governor (thermal), errors and the store's own events are evicted last.
        level = max(level, PRIORITY_CRITICAL)
    return level


class TelemetryRecorder:
    """Feeds the telemetry store from the daemon without ever blocking the caller.

    Calls only append to bounded in-memory queues (no lock, no I/O). A writer thread
    turns them into rows: sampled inference results, interval summaries and events, and
    inserts each cycle's rows in one transaction. When the observation queue is full new
    observations are dropped and counted; events have their own queue.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        device_id: str,
        db_path: Path,
        *,
        boot_id: str | None = None,
        clock: CheckedClock | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        start_uploader: bool = True,
        max_page_count: int | None = None,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.db_path = db_path
        self.boot_id = boot_id or read_boot_id()
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self._clock = clock or CheckedClock()
        self._observations: collections.deque[_Observation] = collections.deque()
        # detectors: each frame's box scores, for the summary's box counts and score histogram
        self._box_scores: collections.deque[Sequence[float]] = collections.deque()
        self._events: collections.deque[_Event] = collections.deque()
        self._queue_max = config.queue_max
        self._dropped_observations = 0
        self._dropped_events = 0
        self._reported_drops = (0, 0)
        self._gauges: tuple[dict[str, float], str, float] = ({}, "", 0.0)
        self._pending: list[NewRecord] = []
        self._wake = threading.Event()
        # _urgent: write at once (critical event, flush, close); _rows_due: a row waits in
        # the queues (an event or a sampled observation), written one flush interval after
        # the last cycle. With neither, the writer sleeps until the summary is due.
        self._urgent = False
        self._rows_due = False
        self._last_cycle_mono_s = time.monotonic()
        self._observed_per_s = 0.0
        self._stop = threading.Event()
        self._closed = False
        # True while the writer runs a cycle: rows it took off the queues are not yet
        # committed, and its connection is in use (flush() waits for this to clear)
        self._in_cycle = False
        self.store = TelemetryStore(
            db_path,
            device_id,
            self.boot_id,
            max_bytes=config.max_bytes,
            synchronous=config.synchronous,
            max_page_count=max_page_count,
            busy_timeout_s=busy_timeout_s,
        )
        # the active model's drift from its golden baseline (armed by the OTA service)
        self._drift = DriftMonitor(over_key=self.store.get_meta(DRIFT_OVER_META) or None)
        last_good = self.store.get_meta("last_good_unix_ns")
        if last_good:
            self._clock.raise_floor(int(last_good))
        for target in self.store.quarantined_to:
            self.event("telemetry.db_quarantined", {"path": str(db_path), "moved_to": target.name})
        now_mono = monotonic_ns()
        self._summary = IntervalSummary(wall_ns(), now_mono)
        self._writer = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._writer.start()
        self._uploader: UploadLoop | None = None
        if start_uploader and config.endpoint:
            self._uploader = UploadLoop(config, db_path, device_id, self.boot_id)
            self._uploader.start()

    # -- the caller's side: append only ---------------------------------------------------

    def event(self, name: str, attrs: Mapping[str, Any], priority: str = "event") -> None:
        """Record an event (ota.state, governor.step, error, ...); never blocks."""
        if len(self._events) >= self._queue_max:
            self._dropped_events += 1
            return
        level = event_priority(name, priority)
        self._events.append((name, dict(attrs), level, self._wall_ns(), self._monotonic_ns()))
        if level >= PRIORITY_CRITICAL:
            self._urgent = True
            self._wake.set()
        else:
            self._signal_row_due()

    def observe_inference(
        self,
        seq: int,
        latency_s: float,
        top_class: int,
        confidence: float,
        meta: Mapping[str, Any],
        sample: Mapping[str, Any] | None = None,
    ) -> None:
        """One inference result: counted in the interval summary, kept if sampled.

        ``sample``: the sampled record's other fields (the daemon's source, result and the
        source's frame metadata), built by the caller only when ``wants_sample(seq)``;
        masked with ``pii_fields`` like the rest of the record.
        """
        if len(self._observations) >= self._queue_max:
            self._dropped_observations += 1
            return
        self._observations.append(
            (
                seq,
                latency_s,
                top_class,
                confidence,
                meta,
                sample,
                self._wall_ns(),
                self._monotonic_ns(),
            )
        )
        if not self._rows_due and is_sampled(seq, self.config.sample_rate):
            self._signal_row_due()

    def wants_sample(self, seq: int) -> bool:
        """True when frame ``seq`` becomes a sampled record (so its details are worth building)."""
        return is_sampled(seq, self.config.sample_rate)

    def observe_boxes(self, scores: Sequence[float]) -> None:
        """A detector frame's box scores (after NMS): counted in the interval summary."""
        if len(self._box_scores) < self._queue_max:
            self._box_scores.append(tuple(scores))

    def _signal_row_due(self) -> None:
        # one wake-up per flush cycle at most: later rows find the flag already set
        if not self._rows_due:
            self._rows_due = True
            self._wake.set()

    def set_drift_baseline(
        self, name: str, version: str, baseline: GoldenBaseline | None, policy: DriftPolicy
    ) -> None:
        """The golden-set histograms of model ``name`` ``version`` (None: unknown) and the
        drift policy; each later summary of that model carries its drift."""
        self._drift.arm(name, version, baseline, policy)

    def drift_since_live(self, name: str, version: str) -> DriftFigures | None:
        """The drift of ``name`` ``version`` over every frame written since it went live."""
        return self._drift.since_live(name, version)

    def set_gauges(self, temps_c: Mapping[str, float], governor_state: str, fps_cap: float) -> None:
        """Latest temperatures and governor state, reported in the next summary."""
        self._gauges = (dict(temps_c), governor_state, float(fps_cap))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write what is queued now (tests and shutdown); True once it is committed.

        Empty queues are not enough: the writer takes rows off them at the start of a cycle
        and commits them at its end. Returning in between let a caller use the store while
        the writer's transaction was still open ("database table is locked").
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # read the queues before the flag: rows queued before this call are either
            # still queued, or taken by a cycle that is running or has committed them
            queued = self._observations or self._events or self._pending
            if not queued and not self._in_cycle:
                return True
            self._urgent = True
            self._wake.set()
            time.sleep(0.01)
        return False

    def upload_status(self) -> dict[str, Any] | None:
        """The uploader's last outcome for status (None when no endpoint is set)."""
        if self._uploader is None:
            return None
        return self._uploader.state.snapshot()

    def kick_upload(self) -> None:
        if self._uploader is not None:
            self._uploader.kick()

    @property
    def dropped(self) -> dict[str, int]:
        return {"observations": self._dropped_observations, "events": self._dropped_events}

    def close(self, timeout_s: float = 5.0) -> None:
        """Write the last partial summary and everything queued; stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._writer.join(timeout_s)
        if self._uploader is not None:
            self._uploader.stop(timeout_s)
        if not self._writer.is_alive():
            self.store.close()

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            # cleared before the queues are read: whatever arrives later signals again
            self._urgent = False
            self._rows_due = False
            self._in_cycle = True
            try:
                self._cycle(final=stopping)
            except Exception:  # the writer must survive any one bad cycle
                log.exception("telemetry writer cycle failed")
            finally:
                self._in_cycle = False
            if stopping:
                return
            if self._pending:
                self._rows_due = True  # a locked database: retry next flush interval
            self._sleep_until_due()

    def _sleep_until_due(self) -> None:
        """Block until the next cycle is due: at once when urgent, one flush interval after
        the last cycle when a row waits, else when the summary is due (no polling)."""
        last_s = self._last_cycle_mono_s
        while not self._stop.is_set() and not self._urgent:
            now_s = time.monotonic()
            if self._rows_due:
                left_s = last_s + self.config.flush_interval_s - now_s
            else:
                left_s = min(self._idle_wait_s(), last_s + IDLE_WAIT_MAX_S) - now_s
            if left_s <= 0:
                return
            self._wake.wait(left_s)
            self._wake.clear()

    def _idle_wait_s(self) -> float:
        """Monotonic time (s) by which an idle writer must cycle: the summary's due time, or
        sooner when observations at the last cycle's rate would half fill the queue."""
        summary_due_s = (
            self._summary.start_mono_ns / 1e9
            + self.config.summary_interval_s
            + (time.monotonic() - self._monotonic_ns() / 1e9)
        )
        rate = self._observed_per_s
        if rate > 0:
            fill_s = (self._queue_max / 2 - len(self._observations)) / rate
            return min(summary_due_s, self._last_cycle_mono_s + max(0.0, fill_s))
        return summary_due_s

    def _cycle(self, final: bool) -> None:
        records = self._pending
        self._pending = []
        cfg = self.config
        summary = self._summary
        now_s = time.monotonic()
        elapsed_s = now_s - self._last_cycle_mono_s
        self._last_cycle_mono_s = now_s
        if elapsed_s > 0:
            self._observed_per_s = len(self._observations) / elapsed_s
        while self._observations:
            obs = self._observations.popleft()
            seq, latency_s, top_class, confidence, meta, sample, wall, mono = obs
            summary.observe(latency_s, top_class, confidence)
            self._drift.observe(meta, top_class, confidence)
            if is_sampled(seq, cfg.sample_rate):
                attrs: dict[str, Any] = {
                    "frame_seq": seq,
                    "latency_ms": round(latency_s * 1000.0, 4),
                    "top_class": top_class,
                    "confidence": round(float(confidence), 6),
                    "meta": dict(meta),
                    **(sample or {}),
                }
                if cfg.pii_fields:
                    # the whole record: a field can hide in the source, the result or the
                    # metadata the source attached, at any depth
                    attrs = mask_pii(attrs, cfg.pii_fields)
                records.append(
                    self._record("sample", PRIORITY_SAMPLE, "inference.sample", attrs, wall, mono)
                )
        while self._box_scores:
            summary.observe_boxes(self._box_scores.popleft())
        while self._events:
            name, attrs, level, wall, mono = self._events.popleft()
            records.append(self._record("event", level, name, attrs, wall, mono))
        for jump in self._clock.take_jumps():
            attrs = {
                "delta_s": round(jump.delta_ns / 1e9, 3),
                "wall_unix_ns": jump.wall_unix_ns,
                "expected_unix_ns": jump.expected_unix_ns,
            }
            records.append(
                self._record("event", PRIORITY_CRITICAL, "clock.jump", attrs, *self._now())
            )
        temps, governor_state, fps_cap = self._gauges
        summary.observe_temps(temps)
        wall, mono = self._now()
        due = (mono - summary.start_mono_ns) / 1e9 >= cfg.summary_interval_s
        if due or (final and summary.latencies_s):
            attrs = summary.finish(wall, mono, temps, governor_state, fps_cap)
            attrs["telemetry_counters"] = self._loss_counters()
            drift, crossed = self._drift.finish_interval()
            if drift is not None:
                attrs["drift"] = drift
                self._keep_drift(drift, wall)
            records.append(
                self._record("summary", PRIORITY_SUMMARY, "inference.summary", attrs, wall, mono)
            )
            if crossed is not None:
                records.append(
                    self._record(
                        "event", PRIORITY_NAMES["event"], "model.drift", crossed, wall, mono
                    )
                )
            self._summary = IntervalSummary(wall, mono)
        self._write(records)

    def _keep_drift(self, drift: Mapping[str, Any], wall_ns: int) -> None:
        """The last drift figures for `edge-agent status` (summaries leave on upload) and
        whether it was over the limit (one model.drift event per crossing, restarts too)."""
        with contextlib.suppress(sqlite3.Error, OSError):
            self.store.set_meta(DRIFT_LAST_META, json.dumps({**drift, "unix_ns": wall_ns}))
            self.store.set_meta(DRIFT_OVER_META, self._drift.over_key or "")

    def _loss_counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        with contextlib.suppress(sqlite3.Error):
            counters = {
                k: v
                for k, v in self.store.counters().items()
                if k.startswith(("evicted.", "dropped", "quarantined."))
            }
        counters["dropped_queue.observation"] = self._dropped_observations
        counters["dropped_queue.event"] = self._dropped_events
        return counters

    def _now(self) -> tuple[int, int]:
        return self._wall_ns(), self._monotonic_ns()

    def _record(
        self, row_type: Any, priority: int, name: str, attrs: dict[str, Any], wall: int, mono: int
    ) -> NewRecord:
        stamp = self._clock.check(wall, mono)
        if row_type == "event" and self.config.pii_fields:
            # every event, the daemon's and the recorder's own, on its way to the store
            attrs = mask_pii(attrs, self.config.pii_fields)
        return NewRecord(
            row_type,
            priority,
            name,
            stamp.time_unix_ns,
            stamp.observed_unix_ns,
            stamp.clock_ok,
            attrs,
        )

    def _write(self, records: list[NewRecord]) -> None:
        drops = (self._dropped_observations, self._dropped_events)
        if drops != self._reported_drops:
            delta = {
                "dropped_queue.observation": drops[0] - self._reported_drops[0],
                "dropped_queue.event": drops[1] - self._reported_drops[1],
            }
            try:
                self.store.add_counters(delta)
                self._reported_drops = drops
            except (sqlite3.Error, OSError):
                pass  # reported in the next cycle
        if not records:
            return
        try:
            self.store.append_resilient(records)
        except sqlite3.Error as exc:
            if is_corrupt(exc):
                target = self.store.recover_from_corruption(str(exc))
                wall, mono = self._now()
                attrs = {"path": str(self.db_path), "moved_to": target.name, "error": str(exc)}
                records.append(
                    self._record(
                        "event", PRIORITY_CRITICAL, "telemetry.db_quarantined", attrs, wall, mono
                    )
                )
                self.store.append_resilient(records)
                return
            # retried every flush interval: one line per minute, not two a second
            if is_locked(exc):
                warn_every(
                    log,
                    "recorder:locked",
                    WARN_EVERY_S,
                    "telemetry database locked; keeping %d rows in memory",
                    len(records),
                )
            else:
                warn_every(
                    log,
                    "recorder:write",
                    WARN_EVERY_S,
                    "telemetry write failed (%s); keeping %d rows in memory",
                    exc,
                    len(records),
                )
            self._keep_pending(records)

    def _keep_pending(self, records: list[NewRecord]) -> None:
        overflow = len(records) - MAX_PENDING_ROWS
        if overflow > 0:
            # Keep every event; drop the oldest samples, then summaries, and count them.
            drop: set[int] = set()
            for level in (PRIORITY_SAMPLE, PRIORITY_SUMMARY):
                for index, rec in enumerate(records):
                    if len(drop) < overflow and rec.priority == level:
                        drop.add(index)
            dropped: dict[str, int] = {}
            for index in drop:
                dropped[records[index].type] = dropped.get(records[index].type, 0) + 1
            records = [rec for index, rec in enumerate(records) if index not in drop]
            self.store.count_dropped(dropped, prefix="dropped_pending")
        self._pending = records
