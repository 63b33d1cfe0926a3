"""The shadow run: a second model on a sample of the served frames, off the frame loop."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import EdgeAgentError
from agent.ota.shadow import (
    Box,
    FrameOutcome,
    ShadowPolicy,
    ShadowResult,
    ShadowTally,
    ShadowVerdict,
    judge_shadow,
    shadow_figures,
    summarize,
)
from agent.pipeline.slot import ActiveModel
from agent.pipeline.sources import Frame

log = logging.getLogger(__name__)

# the worker looks at its stop flag this often while no frame comes
IDLE_POLL_S = 0.2
# the worker thread's nice value above the process's: when a served frame and a shadow
# run want the same core, the kernel gives it to the served frame
WORKER_NICE = 10

# (the served model, its frames, its outputs, its batch latency in s)
Job = tuple[ActiveModel, Sequence[Frame], Sequence[Any], float]


def frame_outcomes(
    model: ActiveModel, outputs: Sequence[Any], rows: int, latency_ms: float
) -> list[FrameOutcome]:
    """Each row's result as the daemon reports it (class, confidence, boxes)."""
    pre = model.preprocess
    if pre.task == "classification":
        from agent.pipeline.postprocess import top_k_rows

        tops = top_k_rows(outputs[0], 1, model.labels)
        return [
            FrameOutcome(int(top[0]["class"]), float(top[0]["score"]), latency_ms)
            for top in tops[:rows]
        ]
    from agent.pipeline.detection import input_image_size, row_result

    size = input_image_size(model.backend.inputs[0].shape, pre.layout)
    out: list[FrameOutcome] = []
    for row in range(rows):
        res = row_result(outputs, pre, model.labels, row, size)
        boxes: tuple[Box, ...] = ()
        if res.key == "detections":
            boxes = tuple(
                (
                    int(d["class"]),
                    float(d["box"][0]),
                    float(d["box"][1]),
                    float(d["box"][2]),
                    float(d["box"][3]),
                )
                for d in res.value
            )
        out.append(FrameOutcome(res.top_class, res.confidence, latency_ms, boxes))
    return out


def _lower_own_priority() -> None:
    """Nice the calling thread (Linux: a thread is a task with its own nice value)."""
    get_id = getattr(threading, "get_native_id", None)
    if get_id is None or not hasattr(os, "setpriority"):
        return
    tid = get_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE)


# After a run too slow for the FPS cap's idle time, how long before one sample may run
# again to re-measure (a model that really does not fit then runs once per this period).
RETRY_SLOW_S = 5.0


class ShadowRun:
    """Runs ``load_model()``'s model on a sample of the frames another model serves.

    The frame loop calls ``offer`` after each served batch: it costs a few attribute reads
    and, for a sampled frame, one ``put_nowait`` on a queue of one; a frame that finds the
    worker busy, over its CPU budget or with no idle time left in the FPS cap's period is
    dropped (counted), never waited for. Everything else (the shadow model's load and
    warm-up, its preprocessing and run, both models' postprocessing, the tally) happens
    on the worker thread. ``shadow_is_new``: the shadow model is the candidate (a shadow
    period before activation) rather than the old model (probation).

    A shadow inference over ``policy.timeout_s`` (a load over ``load_timeout_s``) ends the
    run; its thread cannot be killed, so it is left to finish on its own and closes its
    model then. Who is blamed for a run that cannot go on (hung, failed to load, a bug in
    the worker) depends on what it ran: the candidate (before activation) fails the check;
    the old model (probation) only leaves the shadow unjudged, for a rollback to a model
    that cannot run would be worse than committing on probation's own checks.
    """

    def __init__(
        self,
        policy: ShadowPolicy,
        load_model: Callable[[], ActiveModel],
        shadow_is_new: bool,
        need_frames: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.need_frames = need_frames or policy.min_frames
        self.shadow_is_new = shadow_is_new
        self._load_model = load_model
        self._clock = clock
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.tally = ShadowTally()
        self._rate = min(1.0, policy.sample_rate)
        self._budget = policy.cpu_budget_pct / 100.0
        self._credit = 0.0
        self._busy_since: float | None = None
        self._busy_s = 0.0
        self._last_run_s: float | None = None
        self._last_run_end = 0.0  # clock() when that run ended
        self._ready = False
        self._closed = False
        self.started_s = clock()
        self.offered = 0
        self._thread = threading.Thread(target=self._work, name="ota-shadow", daemon=True)

    @property
    def role(self) -> str:
        return "candidate" if self.shadow_is_new else "old model"

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ the frame loop's side

    def offer(
        self,
        served: ActiveModel,
        frames: Sequence[Frame],
        outputs: Sequence[Any],
        latency_s: float,
        fps_cap: float = 0.0,
    ) -> bool:
        """Hand a served batch to the worker if it is sampled and fits; never blocks."""
        if self._closed:
            return False
        self.offered += 1
        self._credit += self._rate
        if self._credit < 1.0:
            return False
        self._credit -= 1.0
        now = self._clock()
        busy = self._busy_since
        if busy is not None and now - busy > self._limit_s():
            self._hung(now - busy)
            return False
        if not self._ready or busy is not None or not self._fits(now, latency_s, fps_cap):
            self.tally.dropped += 1
            return False
        try:
            self._queue.put_nowait((served, frames, outputs, latency_s))
        except queue.Full:
            self.tally.dropped += 1
            return False
        return True

    def _fits(self, now: float, latency_s: float, fps_cap: float) -> bool:
        # the CPU budget: the worker's busy time so far against the time it has run
        if self._busy_s > self._budget * max(1e-9, now - self.started_s):
            return False
        # the FPS cap's idle time: the last shadow run must fit in what the served batch
        # left of this period, so the next served frame never waits for a core
        last = self._last_run_s
        if not (fps_cap > 0 and last is not None and last > 1.0 / fps_cap - latency_s):
            return True
        # One slow run (a preemption, a page fault) must not switch the shadow off for
        # good: the figure only refreshes when a run happens, so after RETRY_SLOW_S one
        # sample is let through to measure again (at most one such run per RETRY_SLOW_S).
        return now - self._last_run_end >= RETRY_SLOW_S

    def _limit_s(self) -> float:
        return self.policy.timeout_s if self._ready else self.policy.load_timeout_s

    def _hung(self, waited_s: float) -> None:
        with self._lock:
            self.tally.fail(
                f"the {self.role} hung in shadow: no result after {waited_s:.1f} s "
                f"(timeout {self._limit_s():g} s)"
            )
        self._closed = True
        self._stop.set()

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        _lower_own_priority()
        self._busy_since = self._clock()
        try:
            model = self._load_model()
        except Exception as exc:
            with self._lock:
                what = "failed to load" if isinstance(exc, EdgeAgentError) else "worker failed"
                self.tally.fail(f"the shadow {what}: {type(exc).__name__}: {exc}")
            self._closed = True
            return
        finally:
            self._busy_since = None
        try:
            from agent.pipeline.preprocess import Preprocessor

            to_batch = Preprocessor(model.preprocess, model.backend.inputs[0]).batch
            max_batch = model.backend.max_batch()
            self.tally.detection = model.preprocess.task == "detection"
            self._ready = not self._stop.is_set()
            while not self._stop.is_set():
                try:
                    job = self._queue.get(timeout=IDLE_POLL_S)
                except queue.Empty:
                    continue
                if job is None:
                    break
                started = self._clock()
                self._busy_since = started
                try:
                    self._compare(model, to_batch, max_batch, job)
                except Exception as exc:  # a shadow bug must not touch the served frames
                    with self._lock:
                        self.tally.fail(f"shadow worker failed: {type(exc).__name__}: {exc}")
                    self._closed = True
                    break
                finally:
                    spent = self._clock() - started
                    self._busy_s += spent
                    self._last_run_s = spent
                    self._last_run_end = started + spent
                    self._busy_since = None
        finally:
            self._ready = False
            try:
                model.backend.close()
            except Exception:
                log.exception("shadow: closing the shadow model failed")

    def _compare(
        self,
        model: ActiveModel,
        to_batch: Callable[[Sequence[Frame]], Any],
        max_batch: int | None,
        job: Job,
    ) -> None:
        served, frames, served_outputs, served_latency_s = job
        if max_batch is not None:
            frames = frames[:max_batch]
        rows = len(frames)
        served_rows = frame_outcomes(served, served_outputs, rows, served_latency_s * 1000.0)
        from agent.errors import InputDataError, ModelError, RuntimeFaultError

        try:
            x = to_batch(frames)
            started = time.perf_counter()
            outputs = model.backend.run(x)
            latency_ms = (time.perf_counter() - started) * 1000.0
            shadow_rows = frame_outcomes(model, outputs, rows, latency_ms)
        except (InputDataError, RuntimeFaultError, ModelError):
            with self._lock:
                for _ in range(rows):
                    self.tally.record_error(new_side=self.shadow_is_new)
            return
        with self._lock:
            for mine, theirs in zip(shadow_rows, served_rows):
                new, old = (mine, theirs) if self.shadow_is_new else (theirs, mine)
                self.tally.record(new, old)

    # ------------------------------------------------------------------ the OTA side

    def frames(self) -> int:
        return self.tally.frames

    def gave_up(self) -> str | None:
        """Why the run stopped early (hung, failed to load, a worker bug), None while it runs."""
        busy = self._busy_since
        if busy is not None and self._clock() - busy > self._limit_s():
            self._hung(self._clock() - busy)
        return self.tally.failure or None

    def early_failure(self) -> str | None:
        """A reason to fail the candidate now (it hung or broke in shadow, or erred too often),
        cheap enough to ask on every frame."""
        if self.gave_up():
            return self.judge().reason if self.shadow_is_new else None
        tally = self.tally
        if tally.new_errors and tally.new_errors + tally.frames >= min(self.need_frames, 20):
            result = self.judge()
            if result.verdict is ShadowVerdict.FAILED:
                return result.reason
        return None

    def judge(self) -> ShadowResult:
        """The verdict so far (PENDING until ``need_frames`` pairs were compared)."""
        with self._lock:
            return judge_shadow(self.policy, self.tally, self.need_frames)

    def waited_s(self) -> float:
        return self._clock() - self.started_s

    def status(self) -> dict[str, Any]:
        """For `edge-agent status`: the phase's figures so far."""
        with self._lock:
            figures = shadow_figures(self.tally)
            failure = self.tally.failure
        return {
            "runs": self.role,
            "frames": int(figures.get("shadow_frames", 0)),
            "need_frames": self.need_frames,
            "offered": self.offered,
            "summary": summarize(figures),
            "failure": failure or None,
            "quality": figures,
        }

    def close(self, join_s: float = 0.0) -> None:
        """Stop the worker without waiting by default (this may run on the frame loop's
        thread); the worker closes its model once its current run ends, a hung one too."""
        self._closed = True
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_s)
