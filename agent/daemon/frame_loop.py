"""The frame loop: read a batch, run the live model, emit results, feed probation and shadow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.errors import InputDataError, RuntimeFaultError
from agent.ota.host import LiveLatency, ShadowFeed
from agent.pipeline.detection import input_image_size, row_result
from agent.pipeline.latency import LatencyWindow, sorted_percentile
from agent.pipeline.postprocess import top_k_rows
from agent.pipeline.preprocess import Preprocessor
from agent.pipeline.slot import ActiveModel
from agent.pipeline.sources import Frame, Source

if TYPE_CHECKING:
    from agent.daemon.wiring import Daemon

# one logger name for the whole daemon, as before it was split (journal filters use it)
log = logging.getLogger("agent.daemon")

LATENCY_WINDOW = 2048
# the frame loop waits at most this long for a frame, so it stays responsive to signals
READ_TIMEOUT_S = 0.2
# a paused loop (governor hard limit) looks at the governor this often
SLEEP_SLICE_S = 0.1

# per model: the model, its preprocessing (frames -> input batch) and its batch limit
ModelParts = tuple[ActiveModel, Callable[[Sequence[Frame]], Any], int | None]


class LoopStats:
    """Counters and a latency window the frame loop feeds cheaply; read by the status thread."""

    def __init__(self) -> None:
        self.frames = 0
        self.batches = 0
        self.errors = 0
        self.bad_frames = 0
        self.latencies = LatencyWindow(LATENCY_WINDOW)
        self.last_error = ""
        self.last_bad_frame = ""
        self.last_bad_frame_s = 0.0
        self._fps_mark = (time.monotonic(), 0)
        self.fps = 0.0

    def update_fps(self, now: float) -> float:
        t0, n0 = self._fps_mark
        if now - t0 >= 0.5:
            self.fps = (self.frames - n0) / (now - t0)
            self._fps_mark = (now, self.frames)
        return self.fps

    def latency_ms(self) -> dict[str, float | None]:
        return self.latencies.summary_ms()


class FrameLoop:
    """Runs the daemon's frames; owns what the loop caches per model and the swapped-out models.

    The daemon keeps what others read or set (slot, stats, scheduler, source, sinks,
    telemetry, the stop flag); this object keeps what only the loop needs.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.recent_frame: Frame | None = None
        # the OTA shadow evaluation's feed (agent/ota/shadow_run.py), None when none runs
        self.shadow_feed: ShadowFeed | None = None
        self._retired: list[ActiveModel] = []
        self._batches_at_swap = 0
        # the active model's preprocessor and batch limit, built once per model
        self._model_parts: ModelParts | None = None
        # the telemetry meta of the active model, built once per model, not per frame
        self._telemetry_meta: tuple[ActiveModel, dict[str, Any]] | None = None
        # the last emitted frame's box scores (detectors), for probation
        self._last_box_scores: tuple[float, ...] | None = None

    # ------------------------------------------------------------------ models

    def swap(self, new: ActiveModel) -> ActiveModel | None:
        """Make ``new`` (already loaded and warm) the active model between two frames."""
        # the new model's latencies start after the batches run so far
        self._batches_at_swap = self._daemon.stats.batches
        old = self._daemon.slot.swap(new)
        if old is not None:
            self._retired.append(old)
        log.info("model: now %s %s", new.name, new.version)
        return old

    def live_latency(self) -> LiveLatency:
        """The live model's latency over its batches since it was swapped in."""
        stats = self._daemon.stats
        since = max(0, stats.batches - self._batches_at_swap)
        samples = sorted(stats.latencies.last_ms(since))
        if not samples:
            return LiveLatency()
        return LiveLatency(
            p50_ms=sorted_percentile(samples, 50.0),
            p95_ms=sorted_percentile(samples, 95.0),
            samples=len(samples),
        )

    def _parts_for(self, model: ActiveModel) -> ModelParts:
        """What the frame loop needs per model, built once per model rather than per frame."""
        try:
            to_batch: Callable[[Sequence[Frame]], Any] = Preprocessor(
                model.preprocess, model.backend.inputs[0]
            ).batch
        except InputDataError as exc:
            # a schema no frame can meet (mean/std for another channel count): each frame
            # fails with it and is reported like a bad frame
            message = str(exc)

            def refuse(_frames: Sequence[Frame]) -> Any:
                raise InputDataError(message)

            to_batch = refuse
        return model, to_batch, model.backend.max_batch()

    def _close_retired(self) -> None:
        # the loop is between frames, so no retired model is in use any more
        retired, self._retired = self._retired, []
        for old in retired:
            try:
                old.backend.close()
            except Exception:
                log.exception("closing the previous model failed")

    # ------------------------------------------------------------------ the loop

    def _read_batch(self, source: Source, model_batch: int | None) -> list[Frame]:
        first = source.read(READ_TIMEOUT_S)
        if first is None:
            return []
        scheduler_cfg = self._daemon.config.scheduler
        max_batch = scheduler_cfg.max_batch
        if max_batch == 1 or model_batch == 1:
            return [first]
        frames = [first]
        if model_batch is not None:
            # a model with a fixed batch dimension (most TFLite files: 1) takes no more
            max_batch = min(max_batch, model_batch)
        until = time.monotonic() + scheduler_cfg.max_wait_ms / 1000.0
        while len(frames) < max_batch:
            left = until - time.monotonic()
            frame = source.read(max(0.0, left))
            if frame is None:
                break
            frames.append(frame)
        return frames

    def run(self) -> None:
        """Run frames until asked to stop; each frame reads the model slot exactly once.

        Lean on purpose: under a low FPS cap every frame starts on caches the cap's sleep
        left cold, where each Python-level call costs microseconds, so the per-frame path
        reads plain attributes and makes as few calls as it can.
        """
        d = self._daemon
        scheduler = d.scheduler
        stats = d.stats
        telemetry = d.telemetry
        slot = d.slot
        clock = d._clock
        perf_counter = time.perf_counter
        add_latency = stats.latencies.add
        # a wake-up left from an earlier stop must not cut this run's first sleep short
        d._drain_wake_pipe()
        while not d._stop_requested:
            d._heartbeat = clock()
            if d._reload_requested:
                d._check_requests()
            if d._pending_source is not None:
                self._take_pending_source()
            source = d.source
            assert source is not None
            governor = d.governor
            if governor is not None and governor.paused:
                d._state = "paused"
                scheduler.restart()
                d._sleep(SLEEP_SLICE_S)
                continue
            d._state = "running"
            scheduler.wait()
            if d._stop_requested:
                # woken early by the stop: this frame's deadline has not come, so skip it
                break
            # Models swapped out before this frame are no longer in use: close them, then
            # read the slot once, so the batch size and the run come from the same model.
            if self._retired:
                self._close_retired()
            model = slot.current()
            parts = self._model_parts
            if parts is None or parts[0] is not model:
                parts = self._model_parts = self._parts_for(model)
            frames = self._read_batch(source, parts[2])
            if not frames:
                if source.exhausted:
                    log.info("source %s finished; stopping", source.name)
                    d.request_stop("source finished")
                continue
            n_frames = len(frames)
            self.recent_frame = frames[-1]
            if n_frames > 1:
                scheduler.charge(n_frames - 1)
            try:
                x = parts[1](frames)
                started = perf_counter()
                outputs = model.backend.run(x)
                latency_s = perf_counter() - started
            except (InputDataError, RuntimeFaultError) as exc:
                self._frame_failed(exc, n_frames)
                continue
            add_latency(latency_s)
            stats.batches += 1
            stats.frames += n_frames
            confidence = self._emit(model, frames, outputs, latency_s, telemetry)
            if d._ota_observe is not None:
                self._observe_probation(
                    latency_s, confidence, error=False, box_scores=self._last_box_scores
                )
            shadow = self.shadow_feed
            if shadow is not None:
                # after the served result went out: a sampled frame is queued, never waited on
                self._offer_shadow(shadow, model, frames, outputs, latency_s)

    def _take_pending_source(self) -> None:
        # a reload opened a new source: it takes over between two frames
        d = self._daemon
        old_source, d.source = d.source, d._pending_source
        d._pending_source = None
        if old_source is not None:
            old_source.close()

    def _frame_failed(self, exc: InputDataError | RuntimeFaultError, n_frames: int) -> None:
        d = self._daemon
        stats = d.stats
        stats.errors += 1
        stats.last_error = str(exc)
        if isinstance(exc, InputDataError):
            stats.bad_frames += n_frames
            stats.last_bad_frame = str(exc)
            stats.last_bad_frame_s = time.monotonic()
        d._warn_once(f"frame:{type(exc).__name__}", f"frame skipped: {exc}", 30.0)
        d.event("error", {"where": "frame", "message": str(exc)})
        self._observe_probation(0.0, None, error=True)

    def _observe_probation(
        self,
        latency_s: float,
        confidence: float | None,
        error: bool,
        box_scores: tuple[float, ...] | None = None,
    ) -> None:
        observe = self._daemon._ota_observe
        if observe is None:
            return
        try:
            if box_scores is None:
                observe(latency_s, confidence, error)
            else:  # a detector's frame: probation checks its boxes too
                observe(latency_s, confidence, error, box_scores=box_scores)
        except Exception as exc:  # OTA trouble must not stop inference
            self._daemon._warn_once("ota-observe", f"ota: probation check failed: {exc}")

    def _offer_shadow(
        self,
        feed: ShadowFeed,
        model: ActiveModel,
        frames: Sequence[Frame],
        outputs: Sequence[Any],
        latency_s: float,
    ) -> None:
        try:
            feed(model, frames, outputs, latency_s, self._daemon.scheduler.fps_cap)
        except Exception as exc:  # a shadow's trouble must not stop inference
            self._daemon._warn_once("ota-shadow", f"ota: shadow feed failed: {exc}")

    def _emit(
        self,
        model: ActiveModel,
        frames: Sequence[Frame],
        outputs: Sequence[Any],
        latency_s: float,
        telemetry: Any,
    ) -> float:
        """Send each frame's result to the sinks and telemetry; returns the last confidence."""
        pre = model.preprocess
        sinks = self._daemon.sinks
        confidence = 0.0
        self._last_box_scores = None
        if not sinks and telemetry is None and self._daemon._ota_observe is None:
            return confidence  # nobody reads the result: skip the post-processing
        meta = self._telemetry_meta
        if meta is None or meta[0] is not model:
            meta = self._telemetry_meta = (model, {"model": model.name, "version": model.version})
        latency_ms = round(latency_s * 1000.0, 3)
        # classifiers: top-k of the whole batch at once; detectors: per row below
        tops = (
            top_k_rows(outputs[0], pre.top_k, model.labels)
            if pre.task == "classification"
            else None
        )
        for row, frame in enumerate(frames):
            top_class = -1
            box_scores = None
            if tops is None:
                # detectors (boxes) and segmenters (class pixel shares), per row
                res = row_result(
                    outputs,
                    pre,
                    model.labels,
                    row,
                    input_image_size(model.backend.inputs[0].shape, pre.layout),
                )
                key, value, box_scores = res.key, res.value, res.box_scores
                top_class, confidence = res.top_class, res.confidence
                self._last_box_scores = box_scores
            else:
                best = tops[row]
                top_class, confidence = int(best[0]["class"]), float(best[0]["score"])
                key, value = "top", best
            if sinks:
                # built only for sinks: the result dict is most of a frame's Python work
                result: dict[str, Any] = {
                    "seq": frame.seq,
                    "ts": round(frame.captured_s, 3),
                    "source": frame.source,
                    "model": model.name,
                    "version": model.version,
                    "latency_ms": latency_ms,
                    key: value,
                }
                for sink in sinks:
                    sink.put(result)
            if telemetry is not None:
                try:
                    sample = None
                    if telemetry.wants_sample(frame.seq):
                        # built for sampled frames only (1 % by default), like the sink dict
                        sample = self._sample_fields(frame, key, value)
                    telemetry.observe_inference(
                        frame.seq, latency_s, top_class, confidence, meta[1], sample
                    )
                    if box_scores is not None:
                        telemetry.observe_boxes(box_scores)
                except Exception as exc:
                    self._daemon._warn_once("telemetry", f"telemetry observe failed: {exc}")
        return confidence

    def _sample_fields(self, frame: Frame, key: str, value: Any) -> dict[str, Any]:
        """A sampled telemetry record's source, result and frame metadata (docs/telemetry.md)."""
        source_now = self._daemon.source
        name = source_now.name if source_now is not None else frame.source
        source: dict[str, Any] = {"name": name}
        if frame.source != name:
            source["path"] = frame.source  # a file source's frame: the file it came from
        fields: dict[str, Any] = {"source": source, key: value}
        if frame.meta:
            fields["source_meta"] = frame.meta
        return fields
