"""Command-line entry point: parses arguments, maps errors to exit codes and one-line messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__, progress
from agent.errors import EXIT_UNEXPECTED, EXIT_USAGE, EdgeAgentError

# Each module adds its subcommands with add_commands(subparsers); a handler is stored as
# the ``handler`` default and returns the exit code.
COMMAND_MODULES = (
    "agent.commands.runtime",
    "agent.commands.package",
    "agent.commands.gate",
    "agent.commands.daemon",
    "agent.commands.telemetry",
    "agent.commands.ota",
    "agent.commands.fleet",
    "agent.commands.device",
)

# Which module defines each top-level command, so a command imports only its own module
# (and what that module needs): on a 512 MB board `status` must not load numpy, requests
# and cryptography. `edge-agent --help` and unknown commands still import them all.
# tests/test_cli_lean.py checks this table against what the modules really add.
COMMANDS = {
    "infer": "agent.commands.runtime",
    "bench-model": "agent.commands.runtime",
    "keys": "agent.commands.package",
    "package": "agent.commands.package",
    "gate": "agent.commands.gate",
    "run": "agent.commands.daemon",
    "status": "agent.commands.daemon",
    "telemetry": "agent.commands.telemetry",
    "provision": "agent.commands.ota",
    "install": "agent.commands.ota",
    "update": "agent.commands.ota",
    "rollback": "agent.commands.ota",
    "repo": "agent.commands.fleet",
    "publish": "agent.commands.fleet",
    "rollout": "agent.commands.fleet",
    "serve": "agent.commands.fleet",
    "token": "agent.commands.fleet",
    "doctor": "agent.commands.device",
    "config": "agent.commands.device",
}

EPILOG = """\
examples:
  edge-agent infer --model models/digits_fp32.onnx --input x.npy --output y.npy
  edge-agent run --config /etc/edge-agent/agent.yaml
  edge-agent <command> --help
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one 'Error:' line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"Error: {message} ({self.prog})\n")
        raise SystemExit(EXIT_USAGE)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``command`` (a known top-level command) only its module is
    imported and added, which is all parsing that command needs."""
    parser = _Parser(
        prog="edge-agent",
        description="On-device inference agent with signed, gated over-the-air model updates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors; no progress lines"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        module = importlib.import_module(name)
        module.add_commands(sub)
    _add_global_flags(parser)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The top-level command named in ``argv`` (the global options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _add_global_flags(parser: argparse.ArgumentParser) -> None:
    """`--debug` and `-q` also after the subcommand (`edge-agent doctor -q`).

    SUPPRESS as the default: a subcommand that was not given the flag leaves the top-level
    value alone, so `edge-agent -q doctor` keeps working too.
    """
    for action in parser._actions:  # argparse has no public walk over subparsers
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):
            sub.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS,
                help="show tracebacks and debug logs",
            )
            sub.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                default=argparse.SUPPRESS,
                help="only warnings and errors; no progress lines",
            )
            _add_global_flags(sub)


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_in(argv)
    if command is None and "--version" in argv:
        print(f"edge-agent {__version__}")  # before any command module is imported
        return 0
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.debug, args.quiet)
    # Progress lines are for a person at the CLI: never for the daemon, never with -q.
    # Restored afterwards, so main() called in-process (tests) leaves library calls quiet.
    was_enabled = progress.is_enabled()
    progress.configure(not args.quiet and args.command != "run")
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return int(code or 0)
    except BrokenPipeError:
        # `edge-agent telemetry status | head`: the reader has what it wanted. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        _stdout_to_devnull()
        return 0
    except EdgeAgentError as exc:
        if args.debug:
            logging.getLogger("agent").exception("command failed")
        sys.stderr.write(f"Error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        sys.stderr.write(
            f"Error: unexpected {type(exc).__name__}: {exc} (run with --debug for a traceback)\n"
        )
        return EXIT_UNEXPECTED
    finally:
        progress.configure(was_enabled)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
