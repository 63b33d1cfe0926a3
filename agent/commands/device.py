"""CLI commands for the device itself: doctor, config init, config check."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.commands import SubParsers, add_command
from agent.config import AgentConfig, load_config
from agent.errors import EXIT_REFUSED, UsageError
from agent.textio import write_atomic

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")

# One comment per key, shown above it in `config init`; keys without one still appear
# (with their default), so a field someone adds to config.py is never left out.
KEY_COMMENTS: dict[str, str] = {
    "device_id": "this device's id; null: read state_dir/device_id (written by provision)",
    "state_dir": "models, OTA journal, telemetry, keyring (systemd StateDirectory=)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "model.path": "model to run until an OTA package is installed (.onnx, .tflite, .engine)",
    "model.backend": "auto, onnx, litert or tensorrt",
    "model.providers": "ORT providers in order; auto: TensorRT -> CUDA -> CPU",
    "model.intra_op_threads": "ORT threads; 1 keeps a capped agent's CPU use low",
    "model.engine_cache_dir": "TensorRT engine cache (Jetson); null: state_dir",
    "source.kind": "synthetic, directory, video or camera",
    "source.device": "camera index: /dev/video<N>",
    "source.max_frames": "stop after this many frames (0: never)",
    "scheduler.fps_cap": "frames per second at most (0: uncapped)",
    "governor.soft_limit_c": "above this the FPS cap steps down",
    "governor.hard_limit_c": "above this inference pauses",
    "governor.sysfs_root": "read sensors under this root instead of /sys (tests)",
    "telemetry.db_path": "null: state_dir/telemetry.db",
    "telemetry.max_bytes": "on-disk budget; samples are evicted first",
    "telemetry.sample_rate": "fraction of inference results stored as samples",
    "telemetry.endpoint": "OTLP/HTTP base URL (the server's /v1/logs); null: keep local",
    "telemetry.headers": "e.g. {Authorization: 'Bearer <device token>'}",
    "ota.enabled": "poll the repository and install signed, gated packages",
    "ota.repository_url": "the folder that holds metadata/ and targets/",
    "ota.channel": "channel to follow (channels/<name>.json)",
    "ota.hardware_class": "matched against a package's compat.hardware_classes",
    "status.path": "live status JSON; null: state_dir/status.json",
    "status.prometheus_port": "0: off",
}

SINKS_EXAMPLE = """\
# sinks: where results go. Examples:
#   - {kind: jsonl, path: /var/lib/edge-agent/results.jsonl, max_bytes: 10485760}
#   - {kind: http, url: "http://10.0.0.5:8080/results", headers: {Authorization: "Bearer x"}}
#   - {kind: mqtt, url: "mqtt://10.0.0.5:1883", topic: edge/results}
"""


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    # safe_dump ends a lone scalar with a document end marker
    return text.removesuffix("\n...").removesuffix("...").strip()


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _render_section(obj: Any, prefix: str, indent: str, lines: list[str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        comment = KEY_COMMENTS.get(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append("")
            doc = (type(value).__doc__ or "").strip().splitlines()
            if doc:
                lines.append(f"{indent}# {doc[0]}")
            lines.append(f"{indent}{f.name}:")
            _render_section(value, f"{key}.", indent + "  ", lines)
            continue
        if key == "sinks":
            lines.append("")
            lines.extend(indent + line for line in SINKS_EXAMPLE.splitlines())
        line = f"{indent}{f.name}: {_yaml_value(_plain(value))}"
        lines.append(f"{line}  # {comment}" if comment else line)


def render_default_config() -> str:
    """The default AgentConfig as commented YAML; loading it gives AgentConfig() back."""
    lines = [
        "# edge-agent configuration (written by `edge-agent config init`).",
        "# Every key is shown with its default; delete what you do not change.",
        "# Check it with: edge-agent config check /etc/edge-agent/agent.yaml",
    ]
    _render_section(AgentConfig(), "", "", lines)
    return "\n".join(lines) + "\n"


def _config_init(args: argparse.Namespace) -> int:
    text = render_default_config()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out: Path = args.out
    if out.exists() and not args.force:
        raise UsageError(f"{out}: already exists (use --force to overwrite)")
    try:
        write_atomic(out, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write ({exc.strerror})") from None
    print(f"wrote {out}")
    return 0


def _summary(cfg: AgentConfig) -> str:
    model = str(cfg.model.path) if cfg.model.path else "none (OTA package)"
    ota = f"on ({cfg.ota.channel} from {cfg.ota.repository_url})" if cfg.ota.enabled else "off"
    return (
        f"model {model}, backend {cfg.model.backend}, source {cfg.source.kind}, "
        f"fps_cap {cfg.scheduler.fps_cap:g}, {len(cfg.sinks)} sinks, OTA {ota}"
    )


def _config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    warnings: list[str] = []
    if cfg.model.path is not None and not cfg.model.path.exists():
        warnings.append(f"model.path {cfg.model.path}: file not found")
    if cfg.ota.enabled and not cfg.ota.repository_url:
        warnings.append("ota.enabled is true but ota.repository_url is not set")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: OK: {_summary(cfg)}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from agent.doctor import (
        DoctorEnv,
        blocking,
        check_config_file,
        format_report,
        operator_checks,
        report_json,
        run_doctor,
    )

    if args.config is not None:
        cfg = load_config(args.config)
    elif DEFAULT_CONFIG_PATH.is_file():
        cfg = load_config(DEFAULT_CONFIG_PATH)
    else:
        cfg = AgentConfig()
    env = DoctorEnv(
        sysfs_root=args.sysfs_root,
        dev_root=args.dev_root,
        proc_root=args.proc_root,
        state_dir=args.state_dir,
        repo_timeout_s=args.timeout,
        etc_root=args.etc_root,
    )
    rows = [check_config_file(args.config, DEFAULT_CONFIG_PATH), *run_doctor(cfg, env)]
    rows += operator_checks(cfg, env)
    if args.json:
        print(report_json(rows))
    else:
        print(format_report(rows))  # 80 columns, each fix on its own line
        failed = blocking(rows)
        if failed:
            print(f"\n{len(failed)} blocking problem(s): {', '.join(r.name for r in failed)}")
        else:
            print("\nno blocking problems")
    return EXIT_REFUSED if blocking(rows) else 0


def add_commands(sub: SubParsers) -> None:
    """Add doctor and config (init, check)."""
    p = add_command(
        sub,
        "doctor",
        _doctor,
        "Check this device (config, Python, backends, camera, sensors, throttling, clock, "
        "disk, state dir, service user, keyring, repository, golden set, active model, "
        "daemon, telemetry backlog) and print a fix for each problem; "
        "exits 3 on a blocking problem.",
        "edge-agent doctor --config /etc/edge-agent/agent.yaml",
    )
    p.add_argument("--config", type=Path, help=f"agent config (default: {DEFAULT_CONFIG_PATH})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--state-dir", type=Path, help="check this state dir instead of the config's")
    p.add_argument("--sysfs-root", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)
    p.add_argument("--dev-root", type=Path, default=Path("/dev"), help=argparse.SUPPRESS)
    p.add_argument("--proc-root", type=Path, default=Path("/proc"), help=argparse.SUPPRESS)
    p.add_argument("--etc-root", type=Path, default=Path("/etc"), help=argparse.SUPPRESS)
    p.add_argument(
        "--timeout", type=float, default=3.0, help="repository HEAD timeout in s (default: 3)"
    )

    config = add_command(
        sub,
        "config",
        _config_usage,
        "Write a commented default config, or validate one.",
        "edge-agent config init --out /etc/edge-agent/agent.yaml",
    )
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND")
    p = add_command(
        config_sub,
        "init",
        _config_init,
        "Write the default configuration with a comment for each key.",
        "edge-agent config init --out agent.yaml",
    )
    p.add_argument("--out", type=Path, help="file to write (default: print to stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = add_command(
        config_sub,
        "check",
        _config_check,
        "Validate a configuration file; errors name the bad key and line.",
        "edge-agent config check /etc/edge-agent/agent.yaml",
    )
    p.add_argument("file", type=Path, help="the YAML config to check")


def _config_usage(args: argparse.Namespace) -> int:
    raise UsageError("config: choose a subcommand: init or check (edge-agent config --help)")
