"""CLI commands for the package area (filled in by its issue)."""

from __future__ import annotations

from agent.commands import SubParsers


def add_commands(sub: SubParsers) -> None:
    """Add this area's subcommands (none yet)."""
