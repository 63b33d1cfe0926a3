"""The daemon's wiring: builds its parts from config, starts and stops them, routes signals."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import AgentConfig, load_config
from agent.control import ControlServer, control_socket_path
from agent.daemon.frame_loop import FrameLoop, LoopStats
from agent.daemon.models import initial_model, reload_config
from agent.daemon.ota_link import attach_ota, close_ota, recover_ota
from agent.daemon.prometheus import start_metrics_server
from agent.daemon.status import StatusWriter
from agent.errors import EdgeAgentError, StateError
from agent.health.governor import GovernorThread
from agent.ota.host import LiveLatency, ShadowFeed
from agent.pipeline.model import backend_options, configured_model, load_package, package_model
from agent.pipeline.scheduler import FrameScheduler
from agent.pipeline.sinks import Sink, open_sink
from agent.pipeline.slot import ActiveModel, ModelSlot
from agent.pipeline.sources import Frame, Source, open_source
from agent.runtime import BackendOptions
from agent.runtime.base import Backend
from agent.sdnotify import Notifier
from agent.statelock import StateDirLock
from agent.telemetry.identity import resolve_device_id
from agent.telemetry.ratelimit import WarnEvery

if TYPE_CHECKING:  # the metrics endpoint imports http.server only when it is configured
    from http.server import ThreadingHTTPServer

# one logger name for the whole daemon, as before it was split (journal filters use it)
log = logging.getLogger("agent.daemon")

# how long a starting daemon waits for a CLI command that holds the state dir's lock
STATE_LOCK_WAIT_S = 120.0


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Daemon:
    """One running agent. Other parts extend it through ``control.register`` and ``slot``.

    Public for the OTA service (``agent.ota.service.attach(daemon)``): ``config``,
    ``state_dir``, ``slot``, ``control``, ``telemetry`` (a TelemetryRecorder or None),
    ``stats.frames``, ``load_package(dir)``, ``swap_model(new)``, ``event(name, attrs)``
    and ``add_shutdown_hook(fn)``; it implements ModelHost (agent/ota/host.py).

    Its jobs live beside it: the frame loop (frame_loop.FrameLoop), the status file
    (status.StatusWriter), model start and reload (models), OTA (ota_link) and the
    metrics endpoint (prometheus). What several of them read or set stays here.
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
        # a reload's new source, taken up by the loop between two frames
        self._pending_source: Source | None = None
        self._shutdown_hooks: list[Callable[[], None]] = []
        # the frame loop's liveness: the status thread feeds the watchdog only while it moves
        self._heartbeat = clock()
        self._state = "starting"
        self._http: ThreadingHTTPServer | None = None
        # one writer per state dir: held from start to the end of shutdown (agent/statelock.py)
        self._state_lock = StateDirLock(config.state_dir)
        # the attached OTA service and its per-frame probation observer (ota_link.attach_ota)
        self._ota: Any = None
        self._ota_observe: Callable[..., Any] | None = None
        self._warnings = WarnEvery()
        self.last_reload: dict[str, Any] | None = None
        self.exit_reason = ""
        self.frame_loop = FrameLoop(self)
        self.status_writer = StatusWriter(self)

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
        """The installed package (state_dir/current), else config.model.path."""
        return initial_model(self)

    def swap_model(self, new: ActiveModel) -> ActiveModel | None:
        """Make ``new`` (already loaded and warm) the active model between two frames."""
        return self.frame_loop.swap(new)

    # ------------------------------------------------------------------ ModelHost (agent.ota.host)

    def swap_in(self, model: ActiveModel) -> None:
        """ModelHost: swap ``model`` in between two frames (the old one closes there)."""
        self.swap_model(model)

    def live_latency(self) -> LiveLatency:
        """ModelHost: the live model's latency over its batches since it was swapped in."""
        return self.frame_loop.live_latency()

    def recent_frame(self) -> Frame | None:
        """ModelHost: the last frame the loop read (the probe's witness)."""
        return self.frame_loop.recent_frame

    def set_shadow(self, feed: ShadowFeed | None) -> bool:
        """ModelHost: hand each served batch to ``feed`` as well (it never blocks)."""
        self.frame_loop.shadow_feed = feed
        return True

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
        # before any model loads (ota_link.recover_ota says why)
        recover_ota(self.config, self.telemetry)
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
        self.status_writer.take_over()
        self._ota, self._ota_observe = attach_ota(self)
        port = self.config.status.prometheus_port
        if port:
            self._http = start_metrics_server(port, self.status_snapshot)
        self._state = "running"
        self._heartbeat = self._clock()
        self.write_status()
        # linked after the first write, so the link never points at nothing while we run
        self.status_writer.link()
        self.status_writer.start()
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
        close_ota(self._ota)
        if self.governor is not None:
            self.governor.stop()
        self.control.stop()
        for sink in self.sinks:
            sink.close(max(0.0, deadline - time.monotonic()))
        self.status_writer.join(2.0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.source is not None:
            self.source.close()
        self._state = "stopped"
        if self.status_writer.owns_file:
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

    def _check_requests(self) -> None:
        """Act on flags set by signal handlers (which may only set flags)."""
        if self._reload_requested:
            self._reload_requested = False
            threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def loop(self) -> None:
        """Run frames until asked to stop (frame_loop.FrameLoop.run)."""
        self.frame_loop.run()

    # ------------------------------------------------------------------ reload

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what changed; a bad config is refused, old kept."""
        with self._reload_lock:
            try:
                result = reload_config(self)
            except EdgeAgentError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                self.last_reload = {"ok": False, "error": str(exc), "at": time.time()}
                self.event("error", {"where": "reload", "message": str(exc)})
                return {"ok": False, "error": f"reload refused: {exc}"}
            self.last_reload = {**result, "at": time.time()}
            return result

    # ------------------------------------------------------------------ status (StatusWriter)

    def _status_line(self) -> str:
        return self.status_writer.status_line()

    def status_snapshot(self) -> dict[str, Any]:
        """The status figures as status.json has them."""
        return self.status_writer.snapshot()

    def write_status(self) -> dict[str, Any]:
        """Rewrite status.json atomically (one writer at a time: the temp name is per pid)."""
        return self.status_writer.write()

    def _status_tick(self) -> None:
        self.status_writer.tick()


def run_daemon(config_path: Path) -> int:
    """`edge-agent run`: load the config and run until stopped."""
    config = load_config(config_path)
    logging.getLogger().setLevel(config.log_level)
    return Daemon(config, config_path).run()
