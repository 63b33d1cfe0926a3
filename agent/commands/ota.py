"""CLI commands for OTA on the device: provision, install, update, rollback (and ota_status)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.commands import SubParsers, add_command
from agent.errors import EXIT_REFUSED, EdgeAgentError, OTAError, StateError, UsageError
from agent.textio import check_regular_file, read_regular, write_atomic

if TYPE_CHECKING:  # `status` imports this module for ota_status(): no YAML parser for it
    from agent.config import AgentConfig
    from agent.ota.journal import Journal

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.yaml")
CONTROL_TIMEOUT_S = 600.0


def add_commands(sub: SubParsers) -> None:
    """Add provision, install, update and rollback."""
    p = add_command(
        sub,
        "provision",
        _provision,
        "put the trusted TUF root, the release keyring and the device id on this device",
        "edge-agent provision --state-dir /var/lib/edge-agent --tuf-root root.json "
        "--keyring keys/ --device-id pi-0042",
    )
    _add_common(p)
    p.add_argument("--tuf-root", type=Path, required=True, help="the repository's root.json")
    p.add_argument(
        "--keyring",
        type=Path,
        required=True,
        help="folder with keyring.json and the release keys' *.pub.json",
    )
    p.add_argument("--device-id", required=True, help="this device's id (rollout membership)")

    p = add_command(
        sub,
        "install",
        _install,
        "install a package file (USB or local) through the same checks as an OTA update",
        "edge-agent install /media/usb/digits-1.1.0.tar",
    )
    _add_common(p)
    p.add_argument("package", type=Path, help="a signed package .tar")

    p = add_command(
        sub,
        "update",
        _update,
        "check the channel and (with --now) download and install what it offers",
        "edge-agent update --check --config /etc/edge-agent/agent.yaml",
    )
    _add_common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="only say what would happen")
    group.add_argument("--now", action="store_true", help="take the offered release now")

    p = add_command(
        sub,
        "rollback",
        _rollback,
        "switch back to the previous installed model",
        "edge-agent rollback --state-dir /var/lib/edge-agent",
    )
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help=f"agent config (default {DEFAULT_CONFIG})"
    )
    p.add_argument("--state-dir", type=Path, default=None, help="override the config's state_dir")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def load_agent_config(args: argparse.Namespace) -> AgentConfig:
    """The config named by --config (or the default file when present), with --state-dir."""
    from agent.config import AgentConfig, load_config

    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    cfg = load_config(path) if path is not None else AgentConfig()
    if args.state_dir is not None:
        cfg = dataclasses.replace(cfg, state_dir=args.state_dir.resolve())
    return cfg


def _print(args: argparse.Namespace, data: dict[str, Any], line: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(line)


# ---------------------------------------------------------------------------- provision


def _provision(args: argparse.Namespace) -> int:
    cfg = load_agent_config(args)
    state = cfg.state_dir
    root_bytes = _read_small(args.tuf_root, 512 << 10)
    try:
        from tuf.api.metadata import Metadata

        md: Any = Metadata.from_bytes(root_bytes)
        if md.signed.type != "root":
            raise ValueError(f"a {md.signed.type} file, not root")
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    except Exception as exc:  # tuf raises many types for bad input
        raise UsageError(f"{args.tuf_root}: not a valid self-signed TUF root ({exc})") from None
    if not args.keyring.is_dir() or not (args.keyring / "keyring.json").is_file():
        raise UsageError(f"{args.keyring}: expected a folder with keyring.json")
    package = importlib.import_module("agent.package.keys")
    package.Keyring.load(args.keyring)  # refuse a broken keyring before copying it
    device_id = args.device_id.strip()
    if not device_id or "\n" in device_id or len(device_id) > 128:
        raise UsageError(f"--device-id {args.device_id!r}: expected 1..128 characters, one line")
    try:
        (state / "tuf").mkdir(parents=True, exist_ok=True)
        write_atomic(state / "tuf" / "root.json", root_bytes)
        keyring_dir = state / "keyring"
        keyring_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(args.keyring.iterdir()):
            if src.name == "keyring.json" or src.name.endswith(".pub.json"):
                write_atomic(keyring_dir / src.name, _read_small(src, 64 << 10))
        write_atomic(state / "device_id", (device_id + "\n").encode())
    except OSError as exc:
        raise StateError(f"{state}: cannot provision ({exc.strerror})") from None
    _print(
        args,
        {"state_dir": str(state), "device_id": device_id, "tuf_root_version": md.signed.version},
        f"provisioned {state}: device {device_id}, TUF root v{md.signed.version}, keyring copied",
    )
    return 0


def _read_small(path: Path, max_bytes: int) -> bytes:
    try:
        return read_regular(path, max_bytes)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


# ---------------------------------------------------------------------------- daemon link


def _ask_daemon(cfg: AgentConfig, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send a request to the running daemon; None when no daemon listens.

    The socket is found exactly as the daemon places it (``control_socket_path``), so
    ``status.control_socket`` in the config is honoured on both sides.
    """
    from agent.control import control_request, control_socket_path

    sock = control_socket_path(cfg)
    if not sock.exists():
        return None
    try:
        reply: dict[str, Any] = control_request(sock, request, CONTROL_TIMEOUT_S)
    except UsageError:
        # nobody accepts on it (a daemon killed with SIGKILL leaves the file): no daemon
        return None
    except EdgeAgentError as exc:  # a daemon that answers badly is not a reason to install twice
        raise OTAError(f"{sock}: daemon did not answer ({exc})") from None
    return reply


def _daemon_result(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    if not reply.get("ok"):
        code = int(reply.get("exit_code", 3))
        sys.stderr.write(f"Error: {reply.get('error', 'daemon refused')} (daemon)\n")
        return code
    _print(args, reply, str(reply.get("message", "done (daemon)")))
    return 0


@contextlib.contextmanager
def _direct(cfg: AgentConfig) -> Iterator[Any]:
    """The OTA service on the state dir itself, with the state dir's lock held.

    Only when no daemon answered on the control socket: the lock makes this process the
    one writer. A lock held by a process whose socket does not answer (a daemon still
    starting, or hung; another CLI command) is one Error line, exit 3.
    """
    from agent.control import control_socket_path
    from agent.ota.service import OTAService, check_state_files
    from agent.statelock import StateDirLock, StateDirLockedError

    lock = StateDirLock(cfg.state_dir)
    try:
        lock.acquire()
    except StateDirLockedError as exc:
        who = f"process {exc.holder_pid}" if exc.holder_pid else "another process"
        raise StateError(
            f"{cfg.state_dir} is locked by {who} but no daemon answers on "
            f"{control_socket_path(cfg)}: wait for the daemon to finish starting or the "
            "other command to end, or stop it, then try again"
        ) from None
    try:
        check_state_files(cfg)
        service = OTAService(cfg)
        try:
            service.recover(agent_start=False)
            yield service
        finally:
            service.close()
    finally:
        lock.release()


def _require_previous(state_dir: Path) -> None:
    from agent.ota import install

    if install.resolve(state_dir, install.PREVIOUS) is None:
        raise StateError(
            f"{state_dir}: no previous model to roll back to (only the current one is "
            "installed; install another package to have one)"
        )


# ---------------------------------------------------------------------------- install


def _install(args: argparse.Namespace) -> int:
    cfg = load_agent_config(args)
    tar = args.package.resolve()
    # Refused here, before the daemon or the OTA lock is involved (a FIFO would block).
    check_regular_file(tar, "package file")
    reply = _ask_daemon(cfg, {"cmd": "install", "path": str(tar)})
    if reply is not None:
        return _daemon_result(args, reply)
    from agent.ota.service import refuse_during_probation

    with _direct(cfg) as service:
        if service.journal.state().value == "PROBATION":
            # no daemon runs: finish the pending probation offline first
            _probe(service, cfg)
        refuse_during_probation(service)
        with service.step():
            entry = service.install_file(tar)
        # No daemon runs: probation is a frame-by-frame run on the golden inputs here.
        verdict = _probe(service, cfg)
        last = service.journal.last()
    assert last is not None
    _print(
        args,
        {**last.to_dict(), "probation": verdict},
        f"installed {entry.package} {entry.version} (was {entry.from_version or 'none'}); "
        f"probation {verdict}: state {last.state.value}",
    )
    # PROBATION (the daemon or a later run finishes it) and COMMITTED are both success;
    # a probation that rolled the model back is a refusal
    return 0 if last.state.value in ("PROBATION", "COMMITTED") else EXIT_REFUSED


def _probe(service: Any, cfg: AgentConfig) -> str:
    from agent.ota.gate_data import FRAMES_DIR, FRAMES_NAME

    golden = cfg.ota.golden_dir
    if golden is not None and ((golden / FRAMES_NAME).exists() or (golden / FRAMES_DIR).is_dir()):
        inputs = _golden_frame_inputs(service, golden, cfg.ota.probation_frames)
        if isinstance(inputs, str):
            return inputs
        return str(service.probe_offline(inputs).value)
    if golden is None or not (golden / "inputs.npy").exists():
        return "pending (no golden inputs; the daemon finishes it)"
    from agent.textio import load_npy

    inputs = load_npy(golden / "inputs.npy")[: cfg.ota.probation_frames]
    return str(service.probe_offline(inputs).value)


def _golden_frame_inputs(service: Any, golden: Path, frames: int) -> Any:
    """A raw-frame golden set's first ``frames`` rows through the new current package's
    own preprocessing (its model inputs for the offline probation), or why not (str)."""
    from agent.ota import install
    from agent.ota.gate_data import load_golden_set, resolve_model
    from agent.ota.gate_frames import PipelineRefused, model_pipeline, preprocess_frames

    current = install.resolve(service.state_dir, install.CURRENT)
    manifest = service.current_manifest()
    if current is None or manifest is None:
        return "pending (no current package; the daemon finishes it)"
    golden_set = load_golden_set(golden)
    golden_set = dataclasses.replace(
        golden_set,
        frames=(golden_set.frames or ())[:frames],
        inputs=golden_set.inputs[:frames],
    )
    backend = service.load_model(current, manifest)
    try:
        return preprocess_frames(
            backend, model_pipeline(resolve_model(current), golden_set), golden_set
        )
    except PipelineRefused as exc:
        return f"pending (the golden frames do not fit: {exc}; the daemon finishes it)"
    finally:
        backend.close()


# ---------------------------------------------------------------------------- update


def _update(args: argparse.Namespace) -> int:
    from agent.ota.service import require_repository

    cfg = load_agent_config(args)
    require_repository(cfg)
    reply = _ask_daemon(cfg, {"cmd": "update"} if args.now else {"cmd": "check"})
    if reply is not None:
        return _daemon_result(args, reply)
    with _direct(cfg) as service:
        with service.step():
            result = service.update_now() if args.now else service.check()
        state = service.journal.state().value
    data = {**result.to_dict(), "state": state}
    verb = "installed" if (args.now and result.take) else "would take" if result.take else "no"
    _print(args, data, f"{verb}: {result.reason} (state {state})")
    return 0


# ---------------------------------------------------------------------------- rollback


def _rollback(args: argparse.Namespace) -> int:
    cfg = load_agent_config(args)
    reply = _ask_daemon(cfg, {"cmd": "rollback"})
    if reply is not None:
        return _daemon_result(args, reply)
    with _direct(cfg) as service:
        _require_previous(cfg.state_dir)
        with service.step():
            entry = service.rollback("operator asked")
    _print(
        args,
        entry.to_dict(),
        f"rolled back to {entry.package} {entry.from_version} (from {entry.version})",
    )
    return 0


# ---------------------------------------------------------------------------- status


def ota_status(state_dir: Path) -> dict[str, Any]:
    """OTA fields for `edge-agent status --json`: versions, the active model's at-rest
    state, the last attempt, the last check, the last gate report and refusal.

    Read-only (state.db is opened with mode=ro), so it is safe beside a running daemon.
    """
    from agent.ota import install
    from agent.ota.journal import Journal

    active_version = _installed_version(state_dir, install.CURRENT)
    out: dict[str, Any] = {
        "active_version": active_version,
        "previous_version": _installed_version(state_dir, install.PREVIOUS),
        "state": "IDLE",
        "active": None,
        "last_outcome": None,
        "in_flight": None,
        "last_check": None,
        "last_change": None,
        "last_gate_report": None,
        "last_refusal": None,
        "last_quality": None,
        "release_floor": None,
    }
    if not (state_dir / "state.db").exists():
        out["last_gate"] = None
        out["last_refusal_reason"] = None
        return out
    journal = Journal(state_dir / "state.db", readonly=True)
    try:
        _read_journal_status(journal, active_version, out)
    finally:
        journal.close()
    out["last_gate"] = gate_summary(out["last_gate_report"])
    refusal = out["last_refusal"]
    out["last_refusal_reason"] = refusal.get("reason") if isinstance(refusal, dict) else None
    return out


def _installed_version(state_dir: Path, which: str) -> str | None:
    """The version in the manifest of the package `current` or `previous` points at."""
    from agent.ota import install

    pkg_dir = install.resolve(state_dir, which)
    if pkg_dir is None:
        return None
    try:
        return str(json.loads((pkg_dir / "manifest.json").read_bytes()).get("version"))
    except (OSError, ValueError):
        return None


def _status_row(entry: Any) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {k: v for k, v in entry.to_dict().items() if k not in ("detail", "txn")}


def _read_journal_status(journal: Journal, active_version: str | None, out: dict[str, Any]) -> None:
    """Fill ota_status()'s journal fields: state, the active model, outcomes, the floor."""
    from agent.ota.journal import END_STATES, LAST_CHECK, LAST_GATE_REPORT
    from agent.ota.states import AT_REST, OTAState

    last = journal.last()
    if last is not None:
        out["state"] = last.state.value
        out["last_change"] = _status_row(last)
        if last.state not in AT_REST:
            out["in_flight"] = _status_row(last)
    # What runs: the newest row that made a model live (COMMITTED names it in
    # version, ROLLED_BACK in from_version); a model on probation is not at rest.
    made_live = journal.last_in((OTAState.COMMITTED, OTAState.ROLLED_BACK))
    if last is not None and last.state is OTAState.PROBATION:
        made_live = last
    if made_live is not None:
        live = (
            made_live.from_version if made_live.state is OTAState.ROLLED_BACK else made_live.version
        )
        if live == active_version:
            out["active"] = {**(_status_row(made_live) or {}), "live_version": live}
    out["last_outcome"] = _status_row(journal.last_in(END_STATES))
    # probation's and the shadow's figures on the last COMMITTED / ROLLED_BACK row
    judged = journal.last_in((OTAState.COMMITTED, OTAState.ROLLED_BACK))
    quality = judged.detail.get("quality") if judged is not None else None
    out["last_quality"] = (
        {"state": judged.state.value, "version": judged.version, "quality": quality}
        if judged is not None and isinstance(quality, dict)
        else None
    )
    check = journal.get_value(LAST_CHECK)
    out["last_check"] = json.loads(check) if check else None
    package = last.package if last is not None and last.package else None
    if package is None and made_live is not None:
        package = made_live.package or None
    if package:
        out["release_floor"] = journal.release_floor(package)
    report = journal.get_value(LAST_GATE_REPORT)
    out["last_gate_report"] = json.loads(report) if report else None
    out["last_refusal"] = journal.last_refusal()


def gate_summary(stored: Any) -> dict[str, Any] | None:
    """The last gate report cut to what `edge-agent status` shows: the version, the
    verdict, the reason and each failed check with its value and threshold."""
    if not isinstance(stored, dict):
        return None
    report = stored.get("report")
    report = report if isinstance(report, dict) else {}
    failed: list[dict[str, Any]] = []
    for check in report.get("checks") or []:
        if isinstance(check, dict) and check.get("verdict") == "fail":
            failed.append(
                {
                    "name": check.get("name"),
                    "value": check.get("value"),
                    "comparison": check.get("comparison"),
                    "threshold": check.get("threshold"),
                }
            )
    return {
        "version": stored.get("version"),
        "passed": stored.get("passed"),
        "reason": stored.get("reason"),
        "failed": failed,
    }


def remove_state(state_dir: Path) -> None:
    """Wipe a state directory's OTA parts (tests and re-provisioning)."""
    for name in ("models", "staging", "tuf", "keyring"):
        shutil.rmtree(state_dir / name, ignore_errors=True)
