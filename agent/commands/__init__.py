"""Subcommands of the edge-agent CLI, one module per area; each exposes add_commands()."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
SubParsers = Any  # argparse._SubParsersAction is private; its type is not exported


def add_command(
    sub: SubParsers, name: str, handler: Handler, help_text: str, example: str
) -> argparse.ArgumentParser:
    """Add one subcommand whose --help ends with an example."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser
