"""The daemon: builds source, model, governor and sinks from config and runs the frame loop."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import AgentConfig, PreprocessConfig, load_config
from agent.control import ControlServer, control_socket_path
from agent.errors import (
    ConfigError,
    EdgeAgentError,
    InputDataError,
    RuntimeFaultError,
    StateError,
)
from agent.health.governor import PAUSED, GovernorThread
from agent.ota.host import LiveLatency, ShadowFeed
from agent.pipeline.detection import input_image_size, row_result
from agent.pipeline.latency import LatencyWindow, sorted_percentile
from agent.pipeline.model import (
    backend_options,
    configured_model,
    load_model_file,
    load_package,
    load_package_backend,
    package_backend_name,
    package_model,
    package_model_parts,
    probe,
    probe_frame,
    read_manifest,
)
from agent.pipeline.postprocess import top_k_rows
from agent.pipeline.preprocess import Preprocessor
from agent.pipeline.scheduler import FrameScheduler
from agent.pipeline.sinks import Sink, open_sink
from agent.pipeline.slot import ActiveModel, ModelSlot
from agent.pipeline.sources import Frame, Source, open_source
from agent.runtime import BackendOptions
from agent.runtime.base import Backend
from agent.sdnotify import Notifier
from agent.statelock import StateDirLock
from agent.telemetry import jsonsafe
from agent.telemetry.identity import resolve_device_id
from agent.telemetry.ratelimit import WarnEvery

if TYPE_CHECKING:  # the metrics endpoint imports http.server only when it is configured
    from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)

LATENCY_WINDOW = 2048
# the frame loop waits at most this long for a frame, so it stays responsive to signals
READ_TIMEOUT_S = 0.2
# a paused loop (governor hard limit) looks at the governor this often
SLEEP_SLICE_S = 0.1
# with no systemd watchdog, a loop silent this long is reported as stalled in status
STALL_S = 10.0
# how long a starting daemon waits for a CLI command that holds the state dir's lock
STATE_LOCK_WAIT_S = 120.0


def status_path(config: AgentConfig) -> Path:
    """Where readers find the status file: status.path, else state_dir/status.json."""
    return config.status.path or config.state_dir / "status.json"


def status_write_path(config: AgentConfig) -> Path:
    """Where the daemon writes the status file.

    Under systemd (``RuntimeDirectory=edge-agent`` sets $RUNTIME_DIRECTORY) and with no
    status.path configured, it is the tmpfs run dir: a rewrite every second there costs
    microseconds instead of an ext4 create+rename (0.2-1 ms) and no SD-card wear.
    state_dir/status.json then is a symlink to it (link_status_file), so readers keep
    one path.
    """
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if config.status.path is None and runtime_dir:
        return Path(runtime_dir) / "status.json"
    return status_path(config)


def link_status_file(config: AgentConfig) -> None:
    """Point status_path at status_write_path when they differ (atomic: symlink + rename)."""
    target, link = status_write_path(config), status_path(config)
    if target == link:
        return
    tmp = link.with_name(f".{link.name}.link{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class StatusFile:
    """Replaces the status file atomically but without fsync, as cheaply as it can.

    The status is rewritten every second and means nothing after a reboot, so a reader
    must never see half a file (rename) but a power cut may lose the last second (no
    fsync: one a second would cost CPU and wear an SD card for nothing). The paths are
    worked out once and the directory is made only when a write finds it gone: this runs
    on cold caches every interval, where a Path method or a caught EEXIST costs more
    than the write itself.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._target = os.fspath(path)
        self._tmp = os.fspath(path.with_name(f".{path.name}.tmp{os.getpid()}"))

    def write(self, data: bytes) -> None:
        try:
            self._write(data)
        except FileNotFoundError:
            # first write, or the directory was removed under us (a tmpfs run dir is
            # cleaned when systemd restarts the unit): make it and try once more
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(data)

    def _write(self, data: bytes) -> None:
        # plain os calls: the buffered file object costs more than the write itself.
        # O_EXCL|O_NOFOLLOW: status.path may sit in a shared folder such as /tmp, where
        # the temp name can be guessed; a file or symlink left there is removed, never
        # written through (the normal case costs no extra call).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._tmp, flags, 0o644)
        except FileExistsError:
            os.unlink(self._tmp)
            fd = os.open(self._tmp, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(self._tmp, self._target)


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


class Daemon:
    """One running agent. Other parts extend it through ``control.register`` and ``slot``.

    Public for the OTA service (``agent.ota.service.attach(daemon)``): ``config``,
    ``state_dir``, ``slot``, ``control``, ``telemetry`` (a TelemetryRecorder or None),
    ``stats.frames``, ``load_package(dir)``, ``swap_model(new)``, ``event(name, attrs)``
    and ``add_shutdown_hook(fn)``.
    """

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = config.state_dir
        self.slot = ModelSlot()
        self.stats = LoopStats()
        self.notifier = notifier or Notifier()
        self.control = ControlServer(control_socket_path(config))
        self.telemetry: Any = None
        self.scheduler = FrameScheduler(config.scheduler.fps_cap, clock=clock, sleep=self._sleep)
        self.governor: GovernorThread | None = None
        self.source: Source | None = None
        self.sinks: tuple[Sink, ...] = ()
        self._clock = clock
        self._stop_requested = False
        self._reload_requested = False
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        # The frame loop sleeps in select() on this pipe: a stop request (signal handler or
        # another thread) writes a byte and wakes it at once, with no polling in between.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_fds = (self._wake_r,)
        # closed only when the daemon object is gone, so a late signal never writes to an
        # fd number that something else has reused
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._status_lock = threading.Lock()
        self._owns_status = False
        self._status_file = StatusFile(status_path(config))
        self._pending_source: Source | None = None
        self._retired: list[ActiveModel] = []
        self._batches_at_swap = 0
        self._recent_frame: Frame | None = None
        # the active model's preprocessor and batch limit, built once per model
        self._model_parts: ModelParts | None = None
        # the telemetry meta of the active model, built once per model, not per frame
        self._telemetry_meta: tuple[ActiveModel, dict[str, Any]] | None = None
        self._last_snapshot: dict[str, Any] | None = None
        self._described: tuple[ActiveModel, dict[str, Any]] | None = None
        self._pid = os.getpid()
        self._shutdown_hooks: list[Callable[[], None]] = []
        self._heartbeat = clock()
        self._started_wall = time.time()
        self._state = "starting"
        self._status_thread: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        # one writer per state dir: held from start to the end of shutdown (agent/statelock.py)
        self._state_lock = StateDirLock(config.state_dir)
        self._ota: Any = None
        self._ota_observe: Callable[..., Any] | None = None
        # the last emitted frame's box scores (detectors), for probation
        self._last_box_scores: tuple[float, ...] | None = None
        # the OTA shadow evaluation's feed (agent/ota/shadow_run.py), None when none runs
        self._shadow_feed: ShadowFeed | None = None
        self._warnings = WarnEvery()
        self.last_reload: dict[str, Any] | None = None
        self.exit_reason = ""

    # ------------------------------------------------------------------ models

    def _backend_options(self, precision: str = "fp32") -> BackendOptions:
        return backend_options(self.config, precision)

    def load_package(self, package_dir: Path) -> ActiveModel:
        """Load and warm the model of an installed package directory (not yet active)."""
        return load_package(self.config, package_dir)

    def package_model(
        self, backend: Backend, package_dir: Path, manifest: Mapping[str, Any]
    ) -> ActiveModel:
        """An ActiveModel for an already loaded and warm ``backend`` of an installed package."""
        return package_model(backend, package_dir, manifest)

    def load_configured_model(self, config: AgentConfig | None = None) -> ActiveModel:
        """Load and warm the model named by config.model.path."""
        return configured_model(config or self.config)

    def load_initial_model(self) -> ActiveModel:
        current = self.state_dir / "current"
        if current.exists():
            try:
                model = self.load_package(current.resolve())
                log.info(
                    "model: %s %s from the installed package %s",
                    model.name,
                    model.version,
                    current.resolve(),
                )
                return model
            except EdgeAgentError as exc:
                if self.config.model.path is None:
                    raise
                log.error("installed package unusable (%s); falling back to model.path", exc)
                self.event("error", {"where": "load_package", "message": str(exc)})
        model = self.load_configured_model()
        log.info("model: %s from %s", model.name, self.config.model.path)
        return model

    def swap_model(self, new: ActiveModel) -> ActiveModel | None:
        """Make ``new`` (already loaded and warm) the active model between two frames."""
        # the new model's latencies start after the batches run so far
        self._batches_at_swap = self.stats.batches
        old = self.slot.swap(new)
        if old is not None:
            self._retired.append(old)
        log.info("model: now %s %s", new.name, new.version)
        return old

    # ------------------------------------------------------------------ ModelHost (agent.ota.host)

    def swap_in(self, model: ActiveModel) -> None:
        """ModelHost: swap ``model`` in between two frames (the old one closes there)."""
        self.swap_model(model)

    def live_latency(self) -> LiveLatency:
        """ModelHost: the live model's latency over its batches since it was swapped in."""
        since = max(0, self.stats.batches - self._batches_at_swap)
        samples = sorted(self.stats.latencies.last_ms(since))
        if not samples:
            return LiveLatency()
        return LiveLatency(
            p50_ms=sorted_percentile(samples, 50.0),
            p95_ms=sorted_percentile(samples, 95.0),
            samples=len(samples),
        )

    def recent_frame(self) -> Frame | None:
        """ModelHost: the last frame the loop read (the probe's witness)."""
        return self._recent_frame

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        """ModelHost: hand each served batch to ``feed`` as well (it never blocks)."""
        self._shadow_feed = feed
        return True

    def _offer_shadow(
        self,
        feed: ShadowFeed,
        model: ActiveModel,
        frames: Sequence[Frame],
        outputs: Sequence[Any],
        latency_s: float,
    ) -> None:
        try:
            feed(model, frames, outputs, latency_s, self.scheduler.fps_cap)
        except Exception as exc:  # a shadow's trouble must not stop inference
            self._warn_once("ota-shadow", f"ota: shadow feed failed: {exc}")

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

    # ------------------------------------------------------------------ events

    def event(self, name: str, attrs: Mapping[str, Any]) -> None:
        """Record an event in telemetry (when on); never raises."""
        if self.telemetry is None:
            return
        try:
            self.telemetry.event(name, dict(attrs))
        except Exception as exc:
            self._warn_once("telemetry", f"telemetry event failed: {exc}")

    def _warn_once(self, key: str, message: str, every_s: float = 60.0) -> None:
        self._warnings.warn(log, key, every_s, "%s", message)

    def add_shutdown_hook(self, hook: Callable[[], None]) -> None:
        self._shutdown_hooks.append(hook)

    # ------------------------------------------------------------------ start / stop

    def _start_telemetry(self) -> None:
        cfg = self.config.telemetry
        if not cfg.enabled:
            return
        if importlib.util.find_spec("agent.telemetry.recorder") is None:
            log.warning("telemetry: agent.telemetry.recorder is not installed; telemetry off")
            return
        from agent.telemetry.recorder import TelemetryRecorder

        # The same resolution the OTA service uses for rollout membership: the config's id,
        # else the provisioned state_dir/device_id, else a hash of /etc/machine-id (never
        # the raw machine id, never the hostname).
        device_id = resolve_device_id(self.config.device_id, self.state_dir)
        db_path = cfg.db_path or self.state_dir / "telemetry.db"
        self.telemetry = TelemetryRecorder(cfg, device_id, db_path)

    def _ota_module(self) -> Any:
        if not self.config.ota.enabled:
            return None
        if importlib.util.find_spec("agent.ota.service") is None:
            log.warning("ota: enabled but agent.ota.service is not installed; OTA off")
            return None
        return importlib.import_module("agent.ota.service")

    def _recover_ota(self) -> None:
        # before any model loads: a package that crashes the process on load must still
        # count toward the crash-loop breaker on every restart
        module = self._ota_module()
        if module is not None and hasattr(module, "recover_at_start"):
            module.recover_at_start(self.config, self.telemetry)

    def _attach_ota(self) -> None:
        module = self._ota_module()
        if module is None:
            return
        self._ota = module.attach(self)
        service = getattr(self._ota, "service", None)
        self._ota_observe = getattr(service, "observe_frame", None)

    def _open_sinks(self, config: AgentConfig) -> tuple[Sink, ...]:
        sinks: list[Sink] = []
        try:
            for sink_cfg in config.sinks:
                sinks.append(open_sink(sink_cfg))
        except BaseException:
            for s in sinks:
                s.close(0.5)
            raise
        return tuple(sinks)

    def _open_source(self, config: AgentConfig, model: ActiveModel) -> Source:
        spec = model.backend.inputs[0]
        return open_source(config.source, spec.shape, model.preprocess.layout)

    def start(self) -> None:
        """Load the model, open everything, and tell systemd we are ready."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"{self.state_dir}: cannot create the state dir ({exc.strerror})"
            ) from None
        # before anything reads or writes the state dir; a CLI command holding it for a
        # moment (an install without a daemon) is waited for
        self._state_lock.acquire(timeout_s=STATE_LOCK_WAIT_S, role="daemon")
        self._start_telemetry()
        self._recover_ota()
        model = self.load_initial_model()
        self.slot.swap(model)
        self.source = self._open_source(self.config, model)
        self.sinks = self._open_sinks(self.config)
        self.governor = GovernorThread(
            self.config.governor,
            self.config.scheduler.fps_cap,
            self.scheduler.set_cap,
            on_event=self.event,
        )
        self.governor.start()
        self.control.register("status", lambda _req: {"status": self.status_snapshot()})
        self.control.register("reload", lambda _req: self.reload())
        self.control.start()
        # from here on this process owns the state dir's status file
        self._status_file = StatusFile(status_write_path(self.config))
        self._owns_status = True
        self._attach_ota()
        self._start_prometheus()
        self._state = "running"
        self._heartbeat = self._clock()
        self.write_status()
        # linked after the first write, so the link never points at nothing while we run
        self._link_status_file()
        self._status_thread = threading.Thread(
            target=self._status_forever, name="status", daemon=True
        )
        self._status_thread.start()
        self.event(
            "daemon.start",
            {"version": __version__, "model": model.name, "model_version": model.version},
        )
        self.notifier.ready(self._status_line())
        log.info(
            "edge-agent %s running: %s %s, source %s, fps cap %g",
            __version__,
            model.name,
            model.version,
            self.source.name,
            self.scheduler.fps_cap,
        )

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the frame loop to finish (signal-safe: sets a flag and writes to a pipe)."""
        self.exit_reason = self.exit_reason or reason
        self._stop_requested = True
        self._poke_loop()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._poke_loop()

    def _poke_loop(self) -> None:
        # os.write on a non-blocking pipe is safe in a signal handler; a full pipe already
        # already holds a wake-up
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        else:
            self.request_stop(signal.Signals(signum).name)

    def install_signal_handlers(self) -> dict[int, Any]:
        """Route SIGTERM/SIGINT/SIGHUP to this daemon; returns the handlers it replaced."""
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def run(self) -> int:
        """Start, loop until SIGTERM/SIGINT or the source ends, drain, and return 0."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = self.install_signal_handlers()
        try:
            self.start()
            self.loop()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def shutdown(self) -> None:
        """Drain the sinks within scheduler.drain_timeout_s and release everything."""
        if self._state == "stopped":
            return
        self._state = "stopping"
        self.notifier.stopping()
        self._stop_requested = True
        self._wake.set()
        deadline = time.monotonic() + self.config.scheduler.drain_timeout_s
        for hook in self._shutdown_hooks:
            try:
                hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self._ota is not None and hasattr(self._ota, "close"):
            try:
                self._ota.close()
            except Exception:
                log.exception("ota: close failed")
        if self.governor is not None:
            self.governor.stop()
        self.control.stop()
        for sink in self.sinks:
            sink.close(max(0.0, deadline - time.monotonic()))
        if self._status_thread is not None:
            self._status_thread.join(2.0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.source is not None:
            self.source.close()
        self._state = "stopped"
        if self._owns_status:
            try:
                self.write_status()
            except OSError as exc:
                log.warning("status: cannot write the final status (%s)", exc)
        if self.telemetry is not None:
            self.event(
                "daemon.stop",
                {"reason": self.exit_reason or "stopped", "frames": self.stats.frames},
            )
            try:
                self.telemetry.close(max(0.5, deadline - time.monotonic()))
            except Exception:
                log.exception("telemetry: close failed")
        self.notifier.close()
        self._state_lock.release()
        log.info(
            "edge-agent stopped (%s) after %d frames",
            self.exit_reason or "stopped",
            self.stats.frames,
        )

    # ------------------------------------------------------------------ the frame loop

    def _sleep(self, seconds: float) -> None:
        """Sleep until the deadline, or less when a stop is requested (no slices, no busy wait).

        A reload request also wakes it: the reload starts at once and the sleep goes on,
        so the frame still runs on its deadline.
        """
        end = time.monotonic() + seconds
        left = seconds
        while left > 0 and not self._stop_requested:
            # a timeout is the deadline (select restarts itself after a signal, PEP 475)
            if not select.select(self._wake_fds, (), (), left)[0]:
                return
            self._drain_wake_pipe()
            if self._reload_requested:
                self._check_requests()
            left = end - time.monotonic()

    def _read_batch(self, source: Source, model_batch: int | None) -> list[Frame]:
        first = source.read(READ_TIMEOUT_S)
        if first is None:
            return []
        max_batch = self.config.scheduler.max_batch
        if max_batch == 1 or model_batch == 1:
            return [first]
        frames = [first]
        if model_batch is not None:
            # a model with a fixed batch dimension (most TFLite files: 1) takes no more
            max_batch = min(max_batch, model_batch)
        until = time.monotonic() + self.config.scheduler.max_wait_ms / 1000.0
        while len(frames) < max_batch:
            left = until - time.monotonic()
            frame = source.read(max(0.0, left))
            if frame is None:
                break
            frames.append(frame)
        return frames

    def loop(self) -> None:
        """Run frames until asked to stop; each frame reads the model slot exactly once.

        Lean on purpose: under a low FPS cap every frame starts on caches the cap's sleep
        left cold, where each Python-level call costs microseconds, so the per-frame path
        reads plain attributes and makes as few calls as it can.
        """
        scheduler = self.scheduler
        stats = self.stats
        telemetry = self.telemetry
        slot = self.slot
        clock = self._clock
        perf_counter = time.perf_counter
        add_latency = stats.latencies.add
        # a wake-up left from an earlier stop must not cut this run's first sleep short
        self._drain_wake_pipe()
        while not self._stop_requested:
            self._heartbeat = clock()
            if self._reload_requested:
                self._check_requests()
            if self._pending_source is not None:
                old_source, self.source = self.source, self._pending_source
                self._pending_source = None
                if old_source is not None:
                    old_source.close()
            source = self.source
            assert source is not None
            governor = self.governor
            if governor is not None and governor.paused:
                self._state = "paused"
                scheduler.restart()
                self._sleep(SLEEP_SLICE_S)
                continue
            self._state = "running"
            scheduler.wait()
            if self._stop_requested:
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
                    self.request_stop("source finished")
                continue
            n_frames = len(frames)
            self._recent_frame = frames[-1]
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
            if self._ota_observe is not None:
                self._observe_probation(
                    latency_s, confidence, error=False, box_scores=self._last_box_scores
                )
            shadow = self._shadow_feed
            if shadow is not None:
                # after the served result went out: a sampled frame is queued, never waited on
                self._offer_shadow(shadow, model, frames, outputs, latency_s)

    def _frame_failed(self, exc: InputDataError | RuntimeFaultError, n_frames: int) -> None:
        stats = self.stats
        stats.errors += 1
        stats.last_error = str(exc)
        if isinstance(exc, InputDataError):
            stats.bad_frames += n_frames
            stats.last_bad_frame = str(exc)
            stats.last_bad_frame_s = time.monotonic()
        self._warn_once(f"frame:{type(exc).__name__}", f"frame skipped: {exc}", 30.0)
        self.event("error", {"where": "frame", "message": str(exc)})
        self._observe_probation(0.0, None, error=True)

    def _observe_probation(
        self,
        latency_s: float,
        confidence: float | None,
        error: bool,
        box_scores: tuple[float, ...] | None = None,
    ) -> None:
        observe = self._ota_observe
        if observe is None:
            return
        try:
            if box_scores is None:
                observe(latency_s, confidence, error)
            else:  # a detector's frame: probation checks its boxes too
                observe(latency_s, confidence, error, box_scores=box_scores)
        except Exception as exc:  # OTA trouble must not stop inference
            self._warn_once("ota-observe", f"ota: probation check failed: {exc}")

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
        sinks = self.sinks
        confidence = 0.0
        self._last_box_scores = None
        if not sinks and telemetry is None and self._ota_observe is None:
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
                    self._warn_once("telemetry", f"telemetry observe failed: {exc}")
        return confidence

    def _sample_fields(self, frame: Frame, key: str, value: Any) -> dict[str, Any]:
        """A sampled telemetry record's source, result and frame metadata (docs/telemetry.md)."""
        name = self.source.name if self.source is not None else frame.source
        source: dict[str, Any] = {"name": name}
        if frame.source != name:
            source["path"] = frame.source  # a file source's frame: the file it came from
        fields: dict[str, Any] = {"source": source, key: value}
        if frame.meta:
            fields["source_meta"] = frame.meta
        return fields

    def _close_retired(self) -> None:
        # the loop is between frames, so no retired model is in use any more
        retired, self._retired = self._retired, []
        for old in retired:
            try:
                old.backend.close()
            except Exception:
                log.exception("closing the previous model failed")

    # ------------------------------------------------------------------ reload

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what changed; a bad config is refused, old kept."""
        with self._reload_lock:
            try:
                result = self._reload()
            except EdgeAgentError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                self.last_reload = {"ok": False, "error": str(exc), "at": time.time()}
                self.event("error", {"where": "reload", "message": str(exc)})
                return {"ok": False, "error": f"reload refused: {exc}"}
            self.last_reload = {**result, "at": time.time()}
            return result

    def _reload(self) -> dict[str, Any]:
        if self.config_path is None:
            raise ConfigError("reload: the daemon was not started from a config file")
        new = load_config(self.config_path)
        old = self.config
        changed: list[str] = []
        restart: list[str] = []
        for name in ("state_dir", "telemetry", "status", "ota", "device_id"):
            if getattr(new, name) != getattr(old, name):
                restart.append(name)
        model: ActiveModel | None = None
        package_active = self.slot.current().manifest is not None
        if not package_active and (new.model != old.model or new.preprocess != old.preprocess):
            model = self.load_configured_model(new)
            changed.append("model")
        sinks: tuple[Sink, ...] | None = None
        source: Source | None = None
        try:
            if model is not None or new.source != old.source:
                # One frame of the new source through the new preprocessing and model
                # before anything is applied: a config no frame can pass is refused here,
                # not found frame after frame once it runs.
                live = model or self.slot.current()
                recent = self._recent_frame if new.source == old.source else None
                probe(live, probe_frame(new.source, live, recent))
            sinks = self._open_sinks(new) if new.sinks != old.sinks else None
            if new.source != old.source or model is not None:
                source = self._open_source(new, model or self.slot.current())
        except BaseException:
            for s in sinks or ():
                s.close(0.5)
            if model is not None:
                model.backend.close()
            raise
        # everything new is built: now apply, between frames
        self.config = dataclasses.replace(
            new,
            state_dir=old.state_dir,
            status=old.status,
            telemetry=old.telemetry,
            ota=old.ota,
            device_id=old.device_id,
        )
        if model is not None:
            self.swap_model(model)
        if source is not None:
            self._pending_source = source
            changed.append("source")
        if sinks is not None:
            old_sinks, self.sinks = self.sinks, sinks
            for s in old_sinks:
                s.close(new.scheduler.drain_timeout_s)
            changed.append("sinks")
        if new.scheduler != old.scheduler:
            self.scheduler.set_cap(new.scheduler.fps_cap)
            changed.append("scheduler")
        if new.governor != old.governor or new.scheduler.fps_cap != old.scheduler.fps_cap:
            if self.governor is not None:
                self.governor.stop()
            self.governor = GovernorThread(
                new.governor, new.scheduler.fps_cap, self.scheduler.set_cap, on_event=self.event
            )
            self.scheduler.set_cap(new.scheduler.fps_cap)
            self.governor.start()
            if new.governor != old.governor:
                changed.append("governor")
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
            changed.append("log_level")
        log.info(
            "reloaded %s: changed %s%s",
            self.config_path,
            ", ".join(changed) or "nothing",
            f"; needs a restart: {', '.join(restart)}" if restart else "",
        )
        return {"ok": True, "changed": changed, "restart_needed": restart}

    # ------------------------------------------------------------------ status

    def _status_line(self) -> str:
        model = self.slot.current()
        return (
            f"{model.name} {model.version}: {self.stats.fps:.1f} fps (cap "
            f"{self.scheduler.fps_cap:g}), {self.stats.frames} frames"
        )

    def status_snapshot(self) -> dict[str, Any]:
        now = self._clock()
        stats = self.stats
        fps = stats.update_fps(now)
        gov = self.governor.snapshot() if self.governor is not None else {"enabled": False}
        power = gov.get("total_power_w")
        model = self.slot.current() if not self.slot.is_empty() else None
        described = self._described
        if model is not None and (described is None or described[0] is not model):
            # once per model, not once per tick
            described = self._described = (model, model.describe())
        state = self._state
        stalled = now - self._heartbeat > self._watchdog_budget_s()
        if stalled and state == "running":
            state = "stalled"
        return {
            "pid": self._pid,
            "version": __version__,
            "state": state,
            "updated": round(time.time(), 3),
            "started": round(self._started_wall, 3),
            "uptime_s": round(time.time() - self._started_wall, 1),
            "interval_s": self.config.status.interval_s,
            "model": dict(described[1]) if model and described else None,
            "fps": round(fps, 2),
            "fps_cap": self.scheduler.fps_cap,
            "latency_ms": stats.latency_ms(),
            "frames": stats.frames,
            "errors": stats.errors,
            "bad_frames": stats.bad_frames,
            "last_error": stats.last_error,
            **self._skipped_status(),
            "late_frames": self.scheduler.late_frames,
            "resyncs": self.scheduler.resyncs,
            "dropped": sum(s.dropped for s in self.sinks),
            "sinks": [s.stats() for s in self.sinks],
            "source": {"name": self.source.name, "state": self.source.state()}
            if self.source
            else None,
            "governor": gov,
            "temps_c": gov.get("temps_c", {}),
            "power_w": power,
            "power_source": gov.get("power_source", "not available"),
            # board watts over frames per second: the whole board's energy per frame, idle
            # draw included, not what the model alone adds
            "energy_per_inference_j": round(power / fps, 4) if power and fps > 0 else None,
            "swaps": self.slot.swaps,
            "last_reload": self.last_reload,
            "config": str(self.config_path) if self.config_path else None,
            "control_socket": str(self.control.sock_path),
            "telemetry": self._telemetry_status(),
            "probation": self._probation_status(),
        }

    def _probation_status(self) -> dict[str, Any] | None:
        """The OTA service's live probation / shadow figures (None when none runs)."""
        service = getattr(self._ota, "service", None)
        status = getattr(service, "probation_status", None)
        if status is None:
            return None
        try:
            result: dict[str, Any] | None = status()
            return result
        except Exception as exc:  # status must always be written
            return {"error": str(exc)}

    def _skipped_status(self) -> dict[str, Any]:
        """Frames never inferred: the source could not deliver them, or they did not fit."""
        skips = getattr(self.source, "skips", None)
        count = int(getattr(skips, "count", 0)) + self.stats.bad_frames
        reason = getattr(skips, "last_reason", None)
        if self.stats.last_bad_frame and self.stats.last_bad_frame_s >= float(
            getattr(skips, "last_s", 0.0)
        ):
            reason = self.stats.last_bad_frame
        return {"frames_skipped": count, "last_skip_reason": reason}

    def _telemetry_status(self) -> dict[str, Any] | None:
        telemetry = self.telemetry
        if telemetry is None:
            return None
        try:
            upload: dict[str, Any] | None = telemetry.upload_status()
            return {"upload": None, **(upload or {}), "dropped": telemetry.dropped}
        except Exception as exc:  # status must always be written
            return {"error": str(exc)}

    def _watchdog_budget_s(self) -> float:
        wd = self.notifier.watchdog_s
        return max(wd / 2, 1.0) if wd else STALL_S

    def write_status(self) -> dict[str, Any]:
        """Rewrite status.json atomically (one writer at a time: the temp name is per pid)."""
        with self._status_lock:
            snap = self.status_snapshot()
            # compact: json's C encoder only runs without indent (5x cheaper every tick)
            data = (jsonsafe.dumps(snap, default=str) + "\n").encode()
            self._status_file.write(data)
            self._last_snapshot = snap
        return snap

    def _link_status_file(self) -> None:
        try:
            link_status_file(self.config)
        except OSError as exc:
            # readers of state_dir/status.json will not see it; the daemon still runs
            log.warning(
                "status: cannot link %s to %s (%s)",
                status_path(self.config),
                self._status_file.path,
                exc,
            )

    def _status_tick(self) -> None:
        snap = self.write_status()
        if self.notifier.enabled:
            # one datagram for both: this runs every interval for months
            fields = [f"STATUS={self._status_line()}"]
            # Feed the watchdog only while the frame loop is alive: a hung inference must
            # make systemd restart us rather than be hidden by this thread.
            if self._clock() - self._heartbeat <= self._watchdog_budget_s():
                fields.insert(0, "WATCHDOG=1")
            self.notifier.send(*fields)
        if self.telemetry is not None:
            try:
                self.telemetry.set_gauges(
                    snap.get("temps_c") or {},
                    snap["governor"].get("state", "off"),
                    float(self.scheduler.fps_cap),
                )
            except Exception as exc:
                self._warn_once("telemetry", f"telemetry gauges failed: {exc}")

    def _status_forever(self) -> None:
        # Wakes once per interval (not in slices; shutdown sets _wake to end it early),
        # so an idle agent costs next to no CPU here.
        interval_s = self.config.status.interval_s
        next_tick = time.monotonic()
        # Runs until shutdown, not until the frame loop ends: a loop() that returns (the
        # source finished) and is run again keeps its status file fresh in between.
        while self._state not in ("stopping", "stopped"):
            if time.monotonic() >= next_tick:
                next_tick += interval_s
                try:
                    self._status_tick()
                except Exception as exc:
                    self._warn_once("status", f"status: cannot write ({exc})")
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()

    def _check_requests(self) -> None:
        """Act on flags set by signal handlers (which may only set flags)."""
        if self._reload_requested:
            self._reload_requested = False
            threading.Thread(target=self.reload, name="reload", daemon=True).start()

    # ------------------------------------------------------------------ prometheus

    def _start_prometheus(self) -> None:
        port = self.config.status.prometheus_port
        if not port:
            return
        daemon = self

        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class MetricsHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                # a fresh snapshot: it costs microseconds, a cached one lags a tick
                body = prometheus_text(daemon.status_snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            self._http = ThreadingHTTPServer(("127.0.0.1", port), MetricsHandler)
        except OSError as exc:
            raise StateError(
                f"status.prometheus_port {port}: cannot listen ({exc.strerror})"
            ) from None
        threading.Thread(target=self._http.serve_forever, name="prometheus", daemon=True).start()


def prometheus_text(snap: Mapping[str, Any]) -> str:
    """The status figures in the Prometheus text exposition format."""
    model = snap.get("model") or {}
    labels = f'model="{model.get("name", "")}",version="{model.get("version", "")}"'
    lines = [
        "# TYPE edge_agent_fps gauge",
        f"edge_agent_fps{{{labels}}} {snap.get('fps', 0)}",
        "# TYPE edge_agent_fps_cap gauge",
        f"edge_agent_fps_cap {snap.get('fps_cap', 0)}",
        "# TYPE edge_agent_frames_total counter",
        f"edge_agent_frames_total {snap.get('frames', 0)}",
        "# TYPE edge_agent_errors_total counter",
        f"edge_agent_errors_total {snap.get('errors', 0)}",
        "# TYPE edge_agent_sink_dropped_total counter",
        f"edge_agent_sink_dropped_total {snap.get('dropped', 0)}",
        "# TYPE edge_agent_latency_ms gauge",
    ]
    quantiles = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
    for key, value in (snap.get("latency_ms") or {}).items():
        if value is not None and key in quantiles:
            lines.append(f'edge_agent_latency_ms{{quantile="{quantiles[key]}"}} {value}')
    lines.append("# TYPE edge_agent_temperature_c gauge")
    for zone, temp in (snap.get("temps_c") or {}).items():
        lines.append(f'edge_agent_temperature_c{{zone="{zone}"}} {temp}')
    paused = 1 if (snap.get("governor") or {}).get("state") == PAUSED else 0
    lines += ["# TYPE edge_agent_paused gauge", f"edge_agent_paused {paused}"]
    return "\n".join(lines) + "\n"


def run_daemon(config_path: Path) -> int:
    """`edge-agent run`: load the config and run until stopped."""
    config = load_config(config_path)
    logging.getLogger().setLevel(config.log_level)
    return Daemon(config, config_path).run()


__all__ = [
    "Daemon",
    "PreprocessConfig",
    "backend_options",
    "control_socket_path",
    "load_model_file",
    "load_package_backend",
    "package_backend_name",
    "package_model_parts",
    "prometheus_text",
    "read_manifest",
    "run_daemon",
]
