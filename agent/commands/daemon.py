"""CLI commands of the daemon: `run` (the long-running agent) and `status` (its live figures)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.commands import SubParsers, add_command
from agent.errors import EXIT_OK, EXIT_REFUSED, ConfigError, StateError

DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


def add_commands(sub: SubParsers) -> None:
    """Add `run` and `status`."""
    p = add_command(
        sub,
        "run",
        cmd_run,
        "Run the inference daemon (systemd runs this; SIGTERM stops it, SIGHUP reloads)",
        "edge-agent run --config docs/examples/agent.yaml",
    )
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="agent config YAML (e.g. /etc/edge-agent/agent.yaml)",
    )
    p = add_command(
        sub,
        "status",
        cmd_status,
        "Show the running daemon's model, FPS, latency, temperatures and governor state",
        "edge-agent status --state-dir /var/lib/edge-agent --json",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read the state dir (and status path) from this config",
    )
    where.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=f"the daemon's state dir (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the status file as JSON, with the OTA state under the key ota",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="live view: redraws in place on a terminal, one line per refresh when piped; "
        "adds device id, channel, OTA polls, telemetry backlog, process CPU and RSS "
        "(Ctrl-C stops, exit 0)",
    )
    p.add_argument(
        "--interval-s",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --watch: seconds between refreshes (default 1.0)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="with --watch: stop after N refreshes (default 0: until Ctrl-C)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import run_daemon

    return run_daemon(args.config)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def format_status(snap: dict[str, Any], running: bool) -> str:
    """The status file as a few readable lines."""
    model = snap.get("model") or {}
    lat = snap.get("latency_ms") or {}
    gov = snap.get("governor") or {}
    temps = snap.get("temps_c") or {}
    age_s = time.time() - float(snap.get("updated", 0))
    state = snap.get("state", "?") if running else f"not running (last {snap.get('state', '?')})"
    source = snap.get("source") or {}
    lines = [
        f"state:      {state}, pid {snap.get('pid')}, up {_fmt(snap.get('uptime_s'), ' s')}"
        f", updated {age_s:.1f} s ago",
        f"model:      {model.get('name', '-')} {model.get('version', '-')} "
        f"({model.get('backend', '-')}, {model.get('model', '-')})",
        f"fps:        {_fmt(snap.get('fps'))} (cap {_fmt(snap.get('fps_cap'))}), "
        f"frames {snap.get('frames', 0)}, errors {snap.get('errors', 0)}, "
        f"dropped {snap.get('dropped', 0)}",
        f"latency:    p50 {_fmt(lat.get('p50'), ' ms')}, p95 {_fmt(lat.get('p95'), ' ms')}, "
        f"p99 {_fmt(lat.get('p99'), ' ms')}",
        "temps:      " + (", ".join(f"{k} {v} C" for k, v in temps.items()) or "no sensors"),
        f"governor:   {gov.get('state', 'off')}"
        + (f" ({gov['reason']})" if gov.get("reason") else ""),
        f"source:     {source.get('name', '-')} ({source.get('state', '-')})",
    ]
    if snap.get("frames_skipped"):
        lines.append(
            f"skipped:    {snap['frames_skipped']} frames (last: {snap.get('last_skip_reason')})"
        )
    upload = (snap.get("telemetry") or {}).get("upload")
    if upload:
        lines.append(f"telemetry:  {upload}")
    if snap.get("power_w") is not None:
        lines.append(
            f"power:      {snap['power_w']} W ({snap.get('power_source', 'rails')}), "
            f"{_fmt(snap.get('energy_per_inference_j'), ' J')}/inference"
        )
    elif "power_source" in snap:
        lines.append("power:      not available (no power rails or PMIC on this board)")
    lines += format_probation(snap.get("probation"))
    lines += format_ota(snap.get("ota"))
    lines += format_drift(snap.get("drift"))
    return "\n".join(lines)


def format_drift(drift: Any) -> list[str]:
    """The live model's drift from its golden-set baseline (the last telemetry summary)."""
    if not isinstance(drift, dict):
        return []
    ts = drift.get("unix_ns")
    when = _ago(ts / 1e9) if isinstance(ts, (int, float)) else "at ?"
    verdict = "DRIFTED" if drift.get("over") else "ok"
    if not drift.get("judged") and not drift.get("over"):
        verdict = "not judged (too few frames)"
    return [
        f"drift:      {drift.get('model')} {drift.get('version')} {verdict}: class PSI "
        f"{_short(drift.get('class_psi'))} (max {_short(drift.get('psi_max'))}), KL "
        f"{_short(drift.get('class_kl'))}; confidence PSI {_short(drift.get('confidence_psi'))}"
        f", KL {_short(drift.get('confidence_kl'))}; {drift.get('frames')} frames vs "
        f"{drift.get('golden_rows')} golden rows, {when}"
    ]


def format_probation(probation: Any) -> list[str]:
    """The live probation / shadow lines (the daemon's status file, while one runs)."""
    if not isinstance(probation, dict):
        return []
    if probation.get("error"):
        return [f"probation:  {probation['error']}"]
    lines = []
    if "frames" in probation:
        floor = probation.get("confidence_floor")
        lines.append(
            f"probation:  {probation['frames']} frames"
            + (f", confidence floor {floor:.3f}" if isinstance(floor, float) else "")
        )
    shadow = probation.get("shadow")
    if isinstance(shadow, dict):
        lines.append(
            f"shadow:     {shadow.get('runs')} on {shadow.get('frames')}/"
            f"{shadow.get('need_frames')} frames: {shadow.get('summary')}"
            + (f" (FAILED: {shadow['failure']})" if shadow.get("failure") else "")
        )
    return lines


def format_ota(ota: Any) -> list[str]:
    """The OTA lines of the status table: versions and state, last gate, last refusal."""
    if not isinstance(ota, dict):
        return []
    if ota.get("error"):
        return [f"ota:        {ota['error']}"]
    active = ota.get("active")
    at_rest = (
        f" {active.get('state')} ({active.get('reason')})"
        if isinstance(active, dict)
        else " (no journal row for it)"
        if ota.get("active_version")
        else ""
    )
    lines = [
        f"ota:        active {ota.get('active_version') or '-'}{at_rest}, previous "
        f"{ota.get('previous_version') or '-'}"
    ]
    flight = ota.get("in_flight")
    outcome = ota.get("last_outcome")
    if isinstance(flight, dict):
        lines.append(
            f"update:     {flight.get('state')} {flight.get('package')} "
            f"{flight.get('version')} (in progress: {flight.get('reason')})"
        )
    elif isinstance(outcome, dict) and not _same_row(outcome, active):
        lines.append(
            f"update:     {outcome.get('state')} {outcome.get('package')} "
            f"{outcome.get('version')} ({outcome.get('reason')}) {_ago(outcome.get('ts'))}"
        )
    check = ota.get("last_check")
    if isinstance(check, dict):
        lines.append(
            f"checked:    {_ago(check.get('ts'))}: "
            + ("" if check.get("ok") else "FAILED: ")
            + f"{check.get('outcome')}"
        )
    gate = ota.get("last_gate")
    if isinstance(gate, dict):
        failed = ", ".join(
            f"{c.get('name')} {_short(c.get('value'))} (needs {c.get('comparison')} "
            f"{_short(c.get('threshold'))})"
            for c in gate.get("failed") or []
        )
        verdict = "passed" if gate.get("passed") else "FAILED"
        if not failed and not gate.get("passed") and gate.get("reason"):
            failed = str(gate["reason"])  # a shadow period's refusal has no gate check
        lines.append(
            f"last gate:  {gate.get('version')} {verdict}" + (f": {failed}" if failed else "")
        )
    quality = ota.get("last_quality")
    if isinstance(quality, dict) and isinstance(quality.get("quality"), dict):
        from agent.ota.shadow import summarize

        figures = quality["quality"]
        shadow = f"shadow {summarize(figures)}" if "shadow_frames" in figures else "no shadow"
        extra = ", ".join(
            f"{name} {figures[name]:.4g}"
            for name in ("error_rate", "latency_p95_ms", "confidence_mean")
            if isinstance(figures.get(name), (int, float))
        )
        lines.append(
            f"quality:    {quality.get('state')} {quality.get('version')}: {shadow}"
            + (f"; {extra}" if extra else "")
        )
    refusal = ota.get("last_refusal")
    if isinstance(refusal, dict):
        lines.append(
            f"refused:    {refusal.get('package')} {refusal.get('version')}: "
            f"{refusal.get('reason')}"
        )
    return lines


def _same_row(a: Any, b: Any) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and a.get("seq") == b.get("seq")


def _ago(ts: Any) -> str:
    """``12 s ago`` style age of a unix time (``at ?`` when it is not one)."""
    if not isinstance(ts, (int, float)):
        return "at ?"
    age_s = time.time() - float(ts)
    if age_s < 0:
        return time.strftime("at %Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
    if age_s < 120:
        return f"{age_s:.0f} s ago"
    if age_s < 7200:
        return f"{age_s / 60:.0f} min ago"
    return time.strftime("at %Y-%m-%d %H:%M UTC", time.gmtime(float(ts)))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_ota_status(state_dir: Path) -> dict[str, Any]:
    """``ota_status(state_dir)`` for the status command, the full gate report left out
    (``gate_summary`` stands in for it); never raises: a status command must answer."""
    try:
        from agent.commands.ota import ota_status

        data = ota_status(state_dir)
    except Exception as exc:  # an unreadable journal is shown, not fatal
        return {"error": f"cannot read the OTA state in {state_dir} ({exc})"}
    data.pop("last_gate_report", None)
    return data


def _status_paths(args: argparse.Namespace) -> tuple[Path, Path, Any]:
    """State dir, status file and the watch's sources. A config that does not load is not
    fatal here: the status file is the daemon's, and `status` must answer while an operator
    is still fixing the config (the daemon runs on the config it loaded)."""
    from agent.commands.status_watch import WatchSources

    if args.config is None:
        state_dir = args.state_dir or DEFAULT_STATE_DIR
        return state_dir, state_dir / "status.json", WatchSources(state_dir)
    from agent.config import load_config  # only with --config: status needs no YAML otherwise

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        state_dir = _state_dir_of_bad_config(args.config) or DEFAULT_STATE_DIR
        sys.stderr.write(f"warning: {exc}; reading the status from {state_dir}\n")
        return state_dir, state_dir / "status.json", WatchSources(state_dir)
    path = cfg.status.path or cfg.state_dir / "status.json"
    return cfg.state_dir, path, WatchSources(cfg.state_dir, cfg.device_id, cfg.ota.channel)


def _state_dir_of_bad_config(path: Path) -> Path | None:
    """Just `state_dir` from a config that does not validate (a typo elsewhere)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")[: 1 << 20])
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = data.get("state_dir") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        return None
    state_dir = Path(value)
    return state_dir if state_dir.is_absolute() else path.parent.resolve() / state_dir


def _read_status(path: Path, state_dir: Path) -> tuple[dict[str, Any], bool]:
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"{path}: no status file (is the daemon running?)") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read the status file ({exc})") from None
    if not isinstance(snap, dict):
        raise StateError(f"{path}: the status file is not a JSON object")
    interval_s = float(snap.get("interval_s") or 1.0)
    fresh = time.time() - float(snap.get("updated", 0)) <= max(5.0, 5 * interval_s)
    running = snap.get("state") not in ("stopped",) and fresh and _pid_alive(snap.get("pid"))
    snap["ota"] = read_ota_status(state_dir)
    from agent.telemetry.status import read_drift

    snap["drift"] = read_drift(state_dir / "telemetry.db")
    return snap, running


def cmd_status(args: argparse.Namespace) -> int:
    state_dir, path, sources = _status_paths(args)
    if getattr(args, "watch", False):
        from agent.commands.status_watch import watch

        def read() -> tuple[dict[str, Any], bool] | str:
            try:
                return _read_status(path, state_dir)
            except StateError as exc:
                return f"waiting: {exc}"

        return watch(read, format_status, sources, interval_s=args.interval_s, count=args.count)
    if not path.exists():
        sys.stderr.write(f"Error: {path}: no status file (is the daemon running?)\n")
        return EXIT_REFUSED
    snap, running = _read_status(path, state_dir)
    if args.json:
        print(json.dumps({**snap, "running": running}, indent=1))
    else:
        print(format_status(snap, running))
    # like `systemctl status`/LSB: 3 means "not running"
    return EXIT_OK if running else EXIT_REFUSED
