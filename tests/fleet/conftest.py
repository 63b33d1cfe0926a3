"""Fleet test fixtures; the helpers live in fleet_testlib.py (importable by the tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, so put this folder on sys.path for fleet_testlib.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_testlib import make_key_dir
from pg_testlib import PostgresServer, running_postgres, why_no_postgres

from agent.fleet.keys import OperatorKey
from agent.fleet.open_store import open_store
from agent.fleet.store import TelemetryStore


@pytest.fixture()
def operator_keys(tmp_path: Path) -> list[OperatorKey]:
    return make_key_dir(tmp_path / "keys")


@pytest.fixture()
def release_keys(operator_keys: list[OperatorKey]) -> list[OperatorKey]:
    return [k for k in operator_keys if k.role == "release"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole run; each test takes its own database."""
    reason = why_no_postgres()
    if reason is not None:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with running_postgres() as server:
        yield server


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The telemetry store's --db value, once per backend."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture()
def fleet_store(store_url: str) -> Iterator[TelemetryStore]:
    store = open_store(store_url)
    try:
        yield store
    finally:
        store.close()
