"""A real, throwaway PostgreSQL server for tests and benchmarks (initdb + pg_ctl, trust auth)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "edge"
# fsync off: a test cluster is thrown away. synchronous_commit stays on so a commit is in
# the OS's hands before it is acknowledged and survives `stop -m immediate`.
TEST_SETTINGS = "-c fsync=off -c full_page_writes=off"
# Crash-safe like the agent's SQLite WAL with synchronous=NORMAL: consistent after a power
# cut, may lose the last commits (what a benchmark should compare against).
DURABLE_SETTINGS = "-c synchronous_commit=off"


def postgres_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None when PostgreSQL is absent."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    # Debian keeps the server binaries off PATH, one folder per major version.
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def why_no_postgres() -> str | None:
    """A skip reason, or None when a PostgreSQL server can be started here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'edge-agent[server]')"
    if postgres_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root and setpriv is missing (initdb refuses to run as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """One cluster in a temp dir, listening on 127.0.0.1:port and a socket in that dir."""

    bin_dir: Path
    root: Path
    port: int
    run_as: list[str]
    settings: str = TEST_SETTINGS

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def _pg_ctl(self, *args: str) -> None:
        cmd = [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl {args[0]} failed: {proc.stderr.strip()}\n{log}")

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            f"-c shared_buffers=16MB -c max_connections=50 {self.settings}"
        )
        self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.root / "server.log"), "-o", options)

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "immediate")

    def restart(self) -> None:
        """Kill the server without a clean shutdown and start it again (drops connections)."""
        self.stop()
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_postgres(settings: str = TEST_SETTINGS) -> Iterator[PostgresServer]:
    """initdb a cluster (as nobody when we are root: initdb refuses root), start, stop."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL binaries not found")
    # Not under pytest's tmp_path: that folder is 0700 root, which nobody cannot enter.
    root = Path(tempfile.mkdtemp(prefix="edge-agent-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
        ]
    server = PostgresServer(bin_dir, root, _free_port(), run_as, settings)
    try:
        init = [
            *run_as,
            str(bin_dir / "initdb"),
            "-D",
            str(server.data_dir),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = subprocess.run(init, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr.strip()}")
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(RuntimeError):
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
