"""CLI commands for the telemetry store on the device: telemetry status and telemetry flush."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from agent.commands import SubParsers, add_command
from agent.config import AgentConfig, TelemetryConfig, load_config
from agent.errors import TelemetryError, UsageError
from agent.progress import Progress
from agent.telemetry.identity import read_boot_id, resolve_device_id
from agent.telemetry.status import telemetry_status
from agent.telemetry.store import StoredRecord, TelemetryStore
from agent.telemetry.uploader import (
    BatchResult,
    OtlpHttpExporter,
    check_endpoint,
    drain,
    exporter_from_config,
)
from agent.textio import format_table


def _add_location_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="agent config file (YAML)")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state directory holding telemetry.db (overrides the config's state_dir)",
    )


def _load(args: argparse.Namespace) -> tuple[AgentConfig, Path]:
    if not args.config and not args.state_dir:
        raise UsageError("give --config FILE or --state-dir DIR (telemetry)")
    cfg = load_config(Path(args.config)) if args.config else AgentConfig()
    state_dir = Path(args.state_dir) if args.state_dir else cfg.state_dir
    if args.state_dir and not state_dir.is_dir():
        raise UsageError(f"{state_dir}: state directory not found (--state-dir)")
    db_path = cfg.telemetry.db_path if cfg.telemetry.db_path else state_dir / "telemetry.db"
    if args.state_dir and cfg.telemetry.db_path is None:
        db_path = state_dir / "telemetry.db"
    return cfg, db_path


def _age(unix_ns: int | None) -> str:
    if not unix_ns:
        return "-"
    seconds = max(0.0, time.time() - unix_ns / 1e9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_ns / 1e9))
    return f"{stamp} ({seconds:.0f} s ago)"


def cmd_status(args: argparse.Namespace) -> int:
    _, db_path = _load(args)
    status = telemetry_status(db_path)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    if not status["exists"]:
        print(f"{db_path}: no telemetry store yet")
        return 0
    if "error" in status:
        raise TelemetryError(f"{db_path}: {status['error']}")
    rows = status["rows"]
    print(f"store      {db_path} ({status['file_bytes']} bytes on disk)")
    print(
        f"rows       {sum(rows.values())} (events {rows['event']}, summaries {rows['summary']},"
        f" samples {rows['sample']})"
    )
    print(f"backlog    {status['backlog_rows']} rows, {status['backlog_bytes']} bytes to upload")
    print(f"quarantine {status['quarantined_rows']} rows refused by the server")
    print(f"oldest     {_age(status['oldest_unix_ns'])}")
    print(f"last ok    {_age(status['last_upload_ok_unix_ns'])}")
    if status["last_upload_error"]:
        print(
            f"last error {status['last_upload_error']}"
            f" at {_age(status['last_upload_error_unix_ns'])}"
        )
    if status["upload"] not in (None, "ok"):
        print(f"upload     {status['upload']} (rows stay queued and are retried)")
    if status["counters"]:
        print()
        print(format_table(["counter", "value"], sorted(status["counters"].items())))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    cfg, db_path = _load(args)
    tcfg: TelemetryConfig = cfg.telemetry
    endpoint = check_endpoint(args.endpoint or tcfg.endpoint, "--endpoint or telemetry.endpoint")
    if args.max_s <= 0:
        raise UsageError(f"--max-s: must be positive, got {args.max_s}")
    if not db_path.exists():
        print(f"{db_path}: no telemetry store yet; nothing to upload")
        return 0
    device_id = resolve_device_id(cfg.device_id, db_path.parent)
    store = TelemetryStore(
        db_path, device_id, read_boot_id(), tcfg.max_bytes, tcfg.synchronous, check_integrity=False
    )
    exporter = exporter_from_config(tcfg, endpoint)
    backlog = int(telemetry_status(db_path).get("backlog_bytes") or 0)
    try:
        with Progress("upload backlog", backlog) as bar:
            result = drain(store, _counted(exporter, bar), tcfg, max_s=args.max_s)
    finally:
        exporter.close()
        store.close()
    print(
        f"uploaded {result.acked_rows} rows ({result.sent_bytes} bytes gzip) to {endpoint};"
        f" {result.rejected_rows} rows refused and quarantined; {result.retries} retries"
    )
    if not result.empty:
        raise TelemetryError(
            f"backlog not empty after {args.max_s:g} s (last error: {result.last_error or 'none'})"
        )
    return 0


def _counted(exporter: OtlpHttpExporter, bar: Progress) -> OtlpHttpExporter:
    """The exporter, reporting each batch that left the backlog (acked or refused) to bar."""
    if not bar.active:
        return exporter
    send = exporter.send

    def counted_send(batch: Sequence[StoredRecord]) -> BatchResult:
        outcome = send(batch)
        if outcome.outcome in ("acked", "rejected"):
            bar.advance(sum(r.size_bytes for r in batch))
        return outcome

    # An instance attribute shadows the method for this flush's exporter only.
    exporter.send = counted_send  # type: ignore[method-assign, assignment]
    return exporter


def add_commands(sub: SubParsers) -> None:
    """Add `telemetry status` and `telemetry flush`."""
    group = sub.add_parser(
        "telemetry",
        help="inspect and upload the device's telemetry store",
        description="Inspect and upload the device's offline telemetry store (telemetry.db).",
    )
    tsub = group.add_subparsers(dest="telemetry_command", metavar="COMMAND")
    group.set_defaults(handler=lambda _args: (group.print_help(), 2)[1])
    status = add_command(
        tsub,
        "status",
        cmd_status,
        "show rows stored, upload backlog, quarantined batches and loss counters",
        "edge-agent telemetry status --state-dir /var/lib/edge-agent",
    )
    _add_location_args(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    flush = add_command(
        tsub,
        "flush",
        cmd_flush,
        "upload the whole backlog now (OTLP/HTTP JSON), oldest first",
        "edge-agent telemetry flush --config /etc/edge-agent/agent.yaml "
        "--endpoint http://collector:4318",
    )
    _add_location_args(flush)
    flush.add_argument(
        "--endpoint", metavar="URL", help="OTLP/HTTP base URL (default: telemetry.endpoint)"
    )
    flush.add_argument(
        "--max-s",
        type=float,
        default=120.0,
        metavar="S",
        help="give up after this many seconds (default: 120)",
    )
