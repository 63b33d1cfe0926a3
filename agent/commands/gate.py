"""CLI command `edge-agent gate`: run the golden-set regression gate on two models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.commands import SubParsers, add_command
from agent.config import load_yaml_file
from agent.errors import EXIT_OK, EXIT_REFUSED, ConfigError, UsageError
from agent.runtime import BACKEND_NAMES
from agent.textio import progress_printer, write_atomic

EXAMPLE = (
    "edge-agent gate --baseline agent/demo/models/digits_fp32.onnx "
    "--candidate agent/demo/models/digits_int8.onnx --golden golden_local --report gate.json"
)


def _package_gate(text: str | None) -> dict[str, Any] | None:
    """--package-gate takes inline JSON or a YAML/JSON file with the thresholds."""
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        data = load_yaml_file(path)
        where = str(path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--package-gate: neither a file nor JSON ({exc.msg})") from None
        where = "--package-gate"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of thresholds")
    return data


def _candidate_gate(candidate: Path) -> dict[str, Any] | None:
    """The candidate package's own ``gate`` (it may lower the child's limits too)."""
    from agent.errors import EdgeAgentError
    from agent.pipeline.model import read_manifest

    if not candidate.is_dir():
        return None
    try:
        gate = read_manifest(candidate).get("gate")
    except EdgeAgentError:
        return None  # the child names what is wrong with the package
    return dict(gate) if isinstance(gate, dict) else None


def cmd_gate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from agent.config import ModelConfig
    from agent.errors import ModelError
    from agent.ota.gate_process import GateLimits, GateRequest, run_gate_child

    baseline, candidate, golden = Path(args.baseline), Path(args.candidate), Path(args.golden)
    for source in (baseline, candidate):
        if not source.exists():
            raise ModelError(f"{source}: model file or package directory not found")
    policy = Path(args.policy) if args.policy else None
    package_gate = _package_gate(args.package_gate)
    # The same seam and limits as the OTA gate: a child process with gate_timeout_s and
    # gate_memory_max_mb, so a candidate that hangs or eats memory cannot take the
    # operator's shell (or the machine) with it.
    limits = GateLimits.from_policy(
        golden, package_gate if package_gate is not None else _candidate_gate(candidate), policy
    )
    request = GateRequest(
        baseline=baseline.resolve(),
        candidate=candidate.resolve(),
        manifest={},
        golden_dir=golden.resolve(),
        baseline_cache=Path(args.cache).resolve() if args.cache else None,
        model=ModelConfig(backend=args.backend),
        memory_max_mb=limits.memory_max_mb,
        policy=policy.resolve() if policy else None,
        package_gate=package_gate,
    )
    show = progress_printer("gate") if sys.stderr.isatty() and not args.json else None
    shown = [0.0]

    def progress(fraction: float) -> None:
        assert show is not None
        shown[0] = fraction
        show(fraction)

    work = Path(tempfile.mkdtemp(prefix="edge-agent-gate-"))
    try:
        outcome = run_gate_child(
            request, work, limits.timeout_s, progress=progress if show is not None else None
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if show is not None and 0.0 < shown[0] < 1.0:
            sys.stderr.write("\n")  # a child that ended mid-pass left the bar open
    data = dict(outcome.report)
    if args.report:
        try:
            write_atomic(Path(args.report), (json.dumps(data, indent=2) + "\n").encode())
        except OSError as exc:
            raise UsageError(f"{args.report}: cannot write the report ({exc.strerror})") from None
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        # a child that timed out, crashed or ran out of memory left no table: say why
        print(outcome.table or f"gate FAIL: {outcome.reason}")
    return EXIT_OK if outcome.passed else EXIT_REFUSED


def add_commands(sub: SubParsers) -> None:
    """Add `gate`."""
    parser = add_command(
        sub,
        "gate",
        cmd_gate,
        "Check a candidate model against the current one on the golden set "
        "(exit 0 pass, 3 fail, 2 bad input).",
        EXAMPLE,
    )
    parser.add_argument(
        "--baseline", required=True, metavar="MODEL", help="current model: file or package dir"
    )
    parser.add_argument(
        "--candidate", required=True, metavar="MODEL", help="new model: file or package dir"
    )
    parser.add_argument(
        "--golden", required=True, metavar="DIR", help="golden set folder (inputs.npy, ...)"
    )
    parser.add_argument(
        "--policy", metavar="FILE", help="thresholds YAML (default: DIR/policy.yaml if present)"
    )
    parser.add_argument(
        "--package-gate",
        metavar="JSON|FILE",
        help="stricter thresholds as a package would ask (default: the candidate "
        "package's manifest `gate`); loosening keys are ignored and reported",
    )
    parser.add_argument("--report", metavar="FILE.json", help="write the full JSON report here")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="baseline output cache: reuse the current model's outputs and latencies from an "
        "earlier gate on the same golden set and backend; store this run's",
    )
    parser.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto", help="runtime (default: auto)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report, no table")
