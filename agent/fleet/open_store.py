"""Opening the fleet telemetry store a URL names: a SQLite file or a PostgreSQL database."""

from __future__ import annotations

from pathlib import Path

from agent.errors import UsageError
from agent.fleet.store import TelemetryStore
from agent.fleet.store_sqlite import SQLiteTelemetryStore


def open_store(url: str) -> TelemetryStore:
    """A store from a SQLite path (or sqlite:/// URL) or a postgresql:// URL."""
    if url.startswith(("postgres://", "postgresql://")):
        try:
            from agent.fleet.store_pg import PostgresTelemetryStore
        except ImportError:
            raise UsageError(
                "PostgreSQL storage needs psycopg: pip install 'edge-agent[server]'"
            ) from None
        return PostgresTelemetryStore(url)
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else url
    return SQLiteTelemetryStore(Path(path))


def is_database_url(value: str) -> bool:
    """True for a PostgreSQL URL (never a file path to check for existence)."""
    return value.startswith(("postgres://", "postgresql://"))
