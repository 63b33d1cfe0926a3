"""`edge-agent status --watch`: the daemon's status plus device, OTA poll, telemetry and process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

# Home and clear to the end of the screen: the view is redrawn in place, not scrolled.
CLEAR = "\x1b[H\x1b[J"


@dataclass(frozen=True)
class WatchSources:
    """Where the extra lines come from; the config is optional (status works without one)."""

    state_dir: Path
    configured_device_id: str | None = None
    channel: str | None = None


class ProcessProbe:
    """CPU % and RSS of the daemon's process (psutil), kept across refreshes: CPU % is the
    share since the previous refresh, so the first one shows none."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._proc: Any = None

    def sample(self, pid: Any) -> tuple[float | None, int | None]:
        import psutil

        if not isinstance(pid, int) or pid <= 0:
            return None, None
        try:
            if pid != self._pid:
                self._pid, self._proc = pid, psutil.Process(pid)
                self._proc.cpu_percent(None)  # starts the interval
                return None, int(self._proc.memory_info().rss)
            return float(self._proc.cpu_percent(None)), int(self._proc.memory_info().rss)
        except (psutil.Error, OSError):
            self._pid, self._proc = None, None
            return None, None


def _when(unix_s: Any, now_s: float) -> str:
    if not isinstance(unix_s, (int, float)):
        return "-"
    stamp = datetime.fromtimestamp(unix_s, timezone.utc).strftime("%H:%M:%S")
    delta = unix_s - now_s
    rel = f"in {delta:.0f} s" if delta >= 0 else f"{-delta:.0f} s ago"
    return f"{stamp} UTC ({rel})"


def _last_poll(state_dir: Path) -> dict[str, Any]:
    """The OTA poll loop's record in state.db (read-only; none when never polled)."""
    import sqlite3

    db = state_dir / "state.db"
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        try:
            row = conn.execute("SELECT value FROM ota_values WHERE name = 'last_poll'").fetchone()
        finally:
            conn.close()
        value = json.loads(row[0]) if row else {}
    except (sqlite3.Error, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def gather_extras(
    snap: dict[str, Any], sources: WatchSources, probe: ProcessProbe
) -> dict[str, Any]:
    """What --watch shows beyond `status`: never raises (a watch must keep drawing)."""
    from agent.telemetry.identity import resolve_device_id
    from agent.telemetry.status import telemetry_status

    poll = _last_poll(sources.state_dir)
    telemetry = telemetry_status(sources.state_dir / "telemetry.db")
    cpu, rss = probe.sample(snap.get("pid"))
    reload = snap.get("last_reload")
    return {
        "device_id": resolve_device_id(sources.configured_device_id, sources.state_dir),
        "channel": sources.channel or poll.get("channel"),
        "last_poll": poll.get("at"),
        "next_poll": poll.get("next_at"),
        "poll_error": poll.get("error"),
        "telemetry_backlog_rows": telemetry.get("backlog_rows"),
        "telemetry_backlog_bytes": telemetry.get("backlog_bytes"),
        "last_upload_error": telemetry.get("last_upload_error") or telemetry.get("error"),
        "reload_refused": (
            reload.get("error") if isinstance(reload, dict) and reload.get("ok") is False else None
        ),
        "cpu_percent": cpu,
        "rss_bytes": rss,
    }


def format_extras(extras: dict[str, Any], now_s: float) -> list[str]:
    backlog = extras["telemetry_backlog_rows"]
    cpu, rss = extras["cpu_percent"], extras["rss_bytes"]
    lines = [
        f"device:     {extras['device_id']}, channel {extras['channel'] or '-'}",
        f"ota poll:   last {_when(extras['last_poll'], now_s)}, "
        f"next {_when(extras['next_poll'], now_s)}"
        + (f", error: {extras['poll_error']}" if extras["poll_error"] else ""),
        "telemetry:  "
        + (
            "no store"
            if backlog is None
            else f"backlog {backlog} rows ({extras['telemetry_backlog_bytes']} bytes)"
        )
        + f", last upload error: {_cut(extras['last_upload_error']) or 'none'}",
        "process:    CPU "
        + ("-" if cpu is None else f"{cpu:.1f} %")
        + ", RSS "
        + ("-" if rss is None else f"{rss / 2**20:.1f} MB"),
    ]
    if extras["reload_refused"]:
        lines.append(f"reload:     REFUSED, running config kept: {extras['reload_refused']}")
    return lines


def _cut(text: Any, max_chars: int = 160) -> str:
    # requests' connection errors run to 300 characters; the live view keeps its lines
    # readable (the piped line and `telemetry status` keep the whole text).
    out = "" if text is None else str(text)
    return out if len(out) <= max_chars else out[: max_chars - 3] + "..."


def one_line(snap: dict[str, Any], running: bool, extras: dict[str, Any], now_s: float) -> str:
    """The piped form: one line per refresh, easy to grep and to log."""
    lat = snap.get("latency_ms") or {}
    cpu, rss = extras["cpu_percent"], extras["rss_bytes"]
    backlog = extras["telemetry_backlog_rows"]
    stamp = datetime.fromtimestamp(now_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = snap.get("state", "?") if running else "not-running"
    fields = [
        stamp,
        f"state={state}",
        f"device={extras['device_id']}",
        f"fps={snap.get('fps', '-')}",
        f"p95_ms={lat.get('p95', '-')}",
        f"frames={snap.get('frames', 0)}",
        f"errors={snap.get('errors', 0)}",
        "backlog_rows=" + ("-" if backlog is None else str(backlog)),
        "cpu_pct=" + ("-" if cpu is None else f"{cpu:.1f}"),
        "rss_mb=" + ("-" if rss is None else f"{rss / 2**20:.1f}"),
    ]
    if extras["last_upload_error"]:
        fields.append(f"upload_error={json.dumps(extras['last_upload_error'])}")
    if extras["reload_refused"]:
        fields.append(f"reload_refused={json.dumps(extras['reload_refused'])}")
    return " ".join(fields)


def watch(
    read: Callable[[], tuple[dict[str, Any], bool] | str],
    render: Callable[[dict[str, Any], bool], str],
    sources: WatchSources,
    *,
    interval_s: float = 1.0,
    count: int = 0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw until Ctrl-C (exit 0) or `count` refreshes; `read` gives (snapshot, running)
    or a message when there is no status file (shown, and the watch goes on)."""
    out = out or sys.stdout
    tty = out.isatty()
    probe = ProcessProbe()
    done = 0
    try:
        while True:
            now_s = time.time()
            got = read()
            if isinstance(got, str):
                text = got if tty else f"{now_s:.0f} {got}"
            else:
                snap, running = got
                extras = gather_extras(snap, sources, probe)
                if tty:
                    body = "\n".join([render(snap, running), *format_extras(extras, now_s)])
                    text = f"{body}\n\n(refreshing every {interval_s:g} s; Ctrl-C to stop)"
                else:
                    text = one_line(snap, running, extras, now_s)
            out.write(CLEAR + text + "\n" if tty else text + "\n")
            out.flush()
            done += 1
            if count and done >= count:
                return 0
            sleep(interval_s)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
    except BrokenPipeError:
        # `status --watch | head`: the reader left; say nothing more.
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
