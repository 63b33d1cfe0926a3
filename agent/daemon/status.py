"""The daemon's status file: where it lives, its cheap atomic writer, and the writer thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import AgentConfig
from agent.daemon.ota_link import probation_status
from agent.telemetry import jsonsafe
from agent.textio import replace_symlink

if TYPE_CHECKING:
    from agent.daemon.wiring import Daemon

# one logger name for the whole daemon, as before it was split (journal filters use it)
log = logging.getLogger("agent.daemon")

# with no systemd watchdog, a loop silent this long is reported as stalled in status
STALL_S = 10.0


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
    # no fsync: the link is remade at every start and means nothing after a reboot
    replace_symlink(link, target, sync_dir=False)


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


class StatusWriter:
    """Builds the daemon's status snapshot and writes it once per interval on its own thread.

    Reads the daemon's figures (stats, governor, sinks, source, OTA probation) but never
    changes them; the daemon decides when it owns the status file (``take_over``).
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = threading.Lock()
        self.owns_file = False
        self.file = StatusFile(status_path(daemon.config))
        self.last_snapshot: dict[str, Any] | None = None
        # the active model's describe(), built once per model, not once per tick
        self._described: tuple[Any, dict[str, Any]] | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._started_wall = time.time()

    def status_line(self) -> str:
        """The one-line STATUS= systemd shows."""
        d = self._daemon
        model = d.slot.current()
        return (
            f"{model.name} {model.version}: {d.stats.fps:.1f} fps (cap "
            f"{d.scheduler.fps_cap:g}), {d.stats.frames} frames"
        )

    def watchdog_budget_s(self) -> float:
        wd = self._daemon.notifier.watchdog_s
        return max(wd / 2, 1.0) if wd else STALL_S

    def snapshot(self) -> dict[str, Any]:
        d = self._daemon
        now = d._clock()
        stats = d.stats
        fps = stats.update_fps(now)
        gov = d.governor.snapshot() if d.governor is not None else {"enabled": False}
        power = gov.get("total_power_w")
        model = d.slot.current() if not d.slot.is_empty() else None
        described = self._described
        if model is not None and (described is None or described[0] is not model):
            # once per model, not once per tick
            described = self._described = (model, model.describe())
        state = d._state
        stalled = now - d._heartbeat > self.watchdog_budget_s()
        if stalled and state == "running":
            state = "stalled"
        return {
            "pid": self._pid,
            "version": __version__,
            "state": state,
            "updated": round(time.time(), 3),
            "started": round(self._started_wall, 3),
            "uptime_s": round(time.time() - self._started_wall, 1),
            "interval_s": d.config.status.interval_s,
            "model": dict(described[1]) if model and described else None,
            "fps": round(fps, 2),
            "fps_cap": d.scheduler.fps_cap,
            "latency_ms": stats.latency_ms(),
            "frames": stats.frames,
            "errors": stats.errors,
            "bad_frames": stats.bad_frames,
            "last_error": stats.last_error,
            **self._skipped_status(),
            "late_frames": d.scheduler.late_frames,
            "resyncs": d.scheduler.resyncs,
            "dropped": sum(s.dropped for s in d.sinks),
            "sinks": [s.stats() for s in d.sinks],
            "source": {"name": d.source.name, "state": d.source.state()} if d.source else None,
            "governor": gov,
            "temps_c": gov.get("temps_c", {}),
            "power_w": power,
            "power_source": gov.get("power_source", "not available"),
            # board watts over frames per second: the whole board's energy per frame, idle
            # draw included, not what the model alone adds
            "energy_per_inference_j": round(power / fps, 4) if power and fps > 0 else None,
            "swaps": d.slot.swaps,
            "last_reload": d.last_reload,
            "config": str(d.config_path) if d.config_path else None,
            "control_socket": str(d.control.sock_path),
            "telemetry": self._telemetry_status(),
            "probation": probation_status(d._ota),
        }

    def _skipped_status(self) -> dict[str, Any]:
        """Frames never inferred: the source could not deliver them, or they did not fit."""
        stats = self._daemon.stats
        skips = getattr(self._daemon.source, "skips", None)
        count = int(getattr(skips, "count", 0)) + stats.bad_frames
        reason = getattr(skips, "last_reason", None)
        if stats.last_bad_frame and stats.last_bad_frame_s >= float(getattr(skips, "last_s", 0.0)):
            reason = stats.last_bad_frame
        return {"frames_skipped": count, "last_skip_reason": reason}

    def _telemetry_status(self) -> dict[str, Any] | None:
        telemetry = self._daemon.telemetry
        if telemetry is None:
            return None
        try:
            upload: dict[str, Any] | None = telemetry.upload_status()
            return {"upload": None, **(upload or {}), "dropped": telemetry.dropped}
        except Exception as exc:  # status must always be written
            return {"error": str(exc)}

    def write(self) -> dict[str, Any]:
        """Rewrite status.json atomically (one writer at a time: the temp name is per pid)."""
        with self._lock:
            snap = self.snapshot()
            # compact: json's C encoder only runs without indent (5x cheaper every tick)
            data = (jsonsafe.dumps(snap, default=str) + "\n").encode()
            self.file.write(data)
            self.last_snapshot = snap
        return snap

    def take_over(self) -> None:
        """From here on this process owns the state dir's status file."""
        self.file = StatusFile(status_write_path(self._daemon.config))
        self.owns_file = True

    def link(self) -> None:
        config = self._daemon.config
        try:
            link_status_file(config)
        except OSError as exc:
            # readers of state_dir/status.json will not see it; the daemon still runs
            log.warning(
                "status: cannot link %s to %s (%s)", status_path(config), self.file.path, exc
            )

    def tick(self) -> None:
        d = self._daemon
        snap = self.write()
        if d.notifier.enabled:
            # one datagram for both: this runs every interval for months
            fields = [f"STATUS={self.status_line()}"]
            # Feed the watchdog only while the frame loop is alive: a hung inference must
            # make systemd restart us rather than be hidden by this thread.
            if d._clock() - d._heartbeat <= self.watchdog_budget_s():
                fields.insert(0, "WATCHDOG=1")
            d.notifier.send(*fields)
        if d.telemetry is not None:
            try:
                d.telemetry.set_gauges(
                    snap.get("temps_c") or {},
                    snap["governor"].get("state", "off"),
                    float(d.scheduler.fps_cap),
                )
            except Exception as exc:
                d._warn_once("telemetry", f"telemetry gauges failed: {exc}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._forever, name="status", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _forever(self) -> None:
        # Wakes once per interval (not in slices; shutdown sets _wake to end it early),
        # so an idle agent costs next to no CPU here.
        d = self._daemon
        interval_s = d.config.status.interval_s
        next_tick = time.monotonic()
        # Runs until shutdown, not until the frame loop ends: a loop() that returns (the
        # source finished) and is run again keeps its status file fresh in between.
        while d._state not in ("stopping", "stopped"):
            if time.monotonic() >= next_tick:
                next_tick += interval_s
                try:
                    self.tick()
                except Exception as exc:
                    d._warn_once("status", f"status: cannot write ({exc})")
            d._wake.wait(max(0.0, next_tick - time.monotonic()))
            d._wake.clear()
