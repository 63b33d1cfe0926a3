"""The SQLite store: identity and seq, WAL/sync settings, eviction, full disk, corruption,
locks and SIGKILL, all on real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from agent.config import TelemetryConfig
from agent.telemetry import telemetry_status
from agent.telemetry.identity import derive_device_id, read_boot_id, resolve_device_id
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.store import (
    PRIORITY_CRITICAL,
    PRIORITY_SAMPLE,
    PRIORITY_SUMMARY,
    NewRecord,
    TelemetryStore,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def rec(kind: str = "sample", priority: int = PRIORITY_SAMPLE, size: int = 10) -> NewRecord:
    return NewRecord(
        kind, priority, f"test.{kind}", time.time_ns(), time.time_ns(), True, {"x": "y" * size}
    )  # type: ignore[arg-type]


def rows(db: Path) -> list[tuple[str, str, int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT device_id, boot_id, seq, type FROM records ORDER BY id"
        ).fetchall()


def test_rows_carry_device_boot_seq_and_wal(db_path: Path) -> None:
    store = TelemetryStore(db_path, "dev-a", "boot-1", synchronous="FULL")
    seqs = store.append([rec(), rec("event", PRIORITY_CRITICAL)]) + store.append(
        [rec("summary", PRIORITY_SUMMARY)]
    )
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert store.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    got = rows(db_path)
    assert [(d, b, t) for d, b, _, t in got] == [
        ("dev-a", "boot-1", "sample"),
        ("dev-a", "boot-1", "event"),
        ("dev-a", "boot-1", "summary"),
    ]
    assert [s for _, _, s, _ in got] == seqs


def test_seq_continues_in_a_boot_and_restarts_in_a_new_one(db_path: Path) -> None:
    with TelemetryStore(db_path, "dev", "boot-1") as store:
        first = store.append([rec(), rec()])
    with TelemetryStore(db_path, "dev", "boot-1") as store:
        again = store.append([rec()])
    assert again == [first[-1] + 1]
    with TelemetryStore(db_path, "dev", "boot-2") as store:
        assert store.append([rec()]) == [1]


def test_fresh_file_in_same_boot_never_reuses_a_seq(db_path: Path) -> None:
    with TelemetryStore(db_path, "dev", "boot-1") as store:
        used = store.append([rec() for _ in range(5)])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with TelemetryStore(db_path, "dev", "boot-1") as store:
        assert store.append([rec()])[0] > used[-1]


def test_device_id_is_hashed_never_raw(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    derived = derive_device_id(machine_id)
    assert derived is not None and "0123456789abcdef" not in derived and len(derived) == 32
    assert derive_device_id(tmp_path / "missing") is None
    assert resolve_device_id("configured", tmp_path, machine_id) == "configured"
    (tmp_path / "device_id").write_text("provisioned-7\n")
    assert resolve_device_id(None, tmp_path, machine_id) == "provisioned-7"
    assert resolve_device_id(None, tmp_path / "nope", machine_id) == derived
    assert read_boot_id(tmp_path / "no-boot-id").startswith("nobootid-")
    (tmp_path / "boot_id").write_text("b00t\n")
    assert read_boot_id(tmp_path / "boot_id") == "b00t"


def test_budget_evicts_samples_first_then_summaries_and_counts(db_path: Path) -> None:
    store = TelemetryStore(db_path, "dev", "boot", max_bytes=600_000)
    critical = store.append([rec("event", PRIORITY_CRITICAL, 200) for _ in range(50)])
    for _ in range(40):
        store.append_resilient(
            [rec("summary", PRIORITY_SUMMARY, 500) for _ in range(5)]
            + [rec(size=500) for _ in range(45)]
        )
    assert store.used_bytes() <= 600_000
    counters = store.counters()
    assert counters["evicted.sample"] > 0
    left = {
        t: n
        for t, n in store.connection.execute("SELECT type, COUNT(*) FROM records GROUP BY type")
    }
    # Summaries survive while any sample could still be evicted; no critical event goes.
    assert left["event"] == 50 and left.get("summary", 0) == 200 - counters.get(
        "evicted.summary", 0
    )
    kept = {s for (s,) in store.connection.execute("SELECT seq FROM records WHERE type='event'")}
    assert kept == set(critical)
    store.close()
    status = telemetry_status(db_path)
    assert status["counters"]["evicted.sample"] == counters["evicted.sample"]


def test_sqlite_full_evicts_then_drops_low_priority_and_never_raises(db_path: Path) -> None:
    # PRAGMA max_page_count makes SQLite itself answer SQLITE_FULL, as a full disk would.
    store = TelemetryStore(db_path, "dev", "boot", max_bytes=1 << 30, max_page_count=40)
    committed_events: list[int] = []
    for i in range(200):
        batch = [rec(size=400) for _ in range(10)] + [rec("event", PRIORITY_CRITICAL, 50)]
        result = store.append_resilient(batch)
        if result.seqs:
            committed_events.append(result.seqs[-1])
        if i > 150:
            break
    counters = store.counters()
    assert counters.get("evicted.sample", 0) > 0, counters
    events = {s for (s,) in store.connection.execute("SELECT seq FROM records WHERE type='event'")}
    # Every batch's event was committed and none was evicted to make room for samples.
    assert len(committed_events) > 100 and set(committed_events) <= events
    # Nothing evictable left and critical rows that do not fit: dropped and counted.
    store.connection.execute("DELETE FROM records WHERE priority < 3")
    result = None
    for _ in range(100):
        result = store.append_resilient([rec("event", PRIORITY_CRITICAL, 3000) for _ in range(5)])
        if result.dropped:
            break
    assert result is not None and result.dropped.get("event") == 5
    store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_corrupt_file_is_quarantined_and_reported(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database" * 500)
    recorder = TelemetryRecorder(
        TelemetryConfig(), "dev", db_path, boot_id="boot", start_uploader=False
    )
    recorder.close()
    moved = [p for p in db_path.parent.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    with sqlite3.connect(db_path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM records")]
        assert names == ["telemetry.db_quarantined"]


def test_corruption_found_while_running_starts_a_fresh_file(db_path: Path) -> None:
    cfg = TelemetryConfig(flush_interval_s=0.05)
    recorder = TelemetryRecorder(cfg, "dev", db_path, boot_id="boot", start_uploader=False)
    for i in range(300):
        recorder.event("test.filler", {"i": i, "pad": "p" * 500})
    assert recorder.flush()
    recorder.store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # Scribble over every page after the header page, behind SQLite's back.
    size = db_path.stat().st_size
    with open(db_path, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xa5" * (size - 4096))
    recorder.store.connection.execute("PRAGMA cache_size=0")
    recorder.store.connection.execute("PRAGMA cache_size=-2000")
    recorder.event("ota.state", {"state": "GATING"})
    assert recorder.flush()
    recorder.close()
    assert any(".corrupt-" in p.name for p in db_path.parent.iterdir())
    with sqlite3.connect(db_path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM records")}
    assert {"telemetry.db_quarantined", "ota.state"} <= names


def test_locked_database_keeps_rows_in_memory_and_never_blocks(db_path: Path) -> None:
    cfg = TelemetryConfig(flush_interval_s=0.05, sample_rate=1.0)
    recorder = TelemetryRecorder(
        cfg, "dev", db_path, boot_id="boot", start_uploader=False, busy_timeout_s=0.05
    )
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    for seq in range(500):
        recorder.observe_inference(seq, 0.001, seq % 10, 0.5, {})
    recorder.event("governor.step", {"state": "soft", "fps_cap": 7.5})
    time.sleep(0.3)  # several writer cycles fail on the lock meanwhile
    assert telemetry_status(db_path)["rows"]["sample"] == 0
    other.execute("COMMIT")
    other.close()
    assert recorder.flush()
    recorder.close()
    status = telemetry_status(db_path)
    assert status["rows"]["sample"] == 500 and status["rows"]["event"] == 1


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agent.telemetry.store import NewRecord, TelemetryStore
    store = TelemetryStore(Path(sys.argv[1]), "dev", "boot")
    while True:
        now = time.time_ns()
        seqs = store.append([NewRecord("sample", 0, "x", now, now, True, {"pad": "z" * 300})
                             for _ in range(20)])
        sys.stdout.write(f"{seqs[-1]}\\n")
        sys.stdout.flush()
    """
)


def test_sigkill_loses_no_acknowledged_row(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    acked: list[int] = []
    for kill in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db_path)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert proc.stdout is not None
        for _ in range(5 + kill * 7):
            line = proc.stdout.readline()
            assert line, "writer died"
            acked.append(int(line))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            present = {s for (s,) in conn.execute("SELECT seq FROM records")}
        # Each acknowledged batch is fully there (20 rows up to the acked seq).
        assert all(all(s - k in present for k in range(20)) for s in acked)
    assert len(acked) == 5 + 12 + 19 + 26


def test_status_of_missing_and_garbage_files(tmp_path: Path) -> None:
    assert telemetry_status(tmp_path / "none.db") == {
        "db_path": str(tmp_path / "none.db"),
        "exists": False,
    }
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    assert "error" in telemetry_status(bad)
    json.dumps(telemetry_status(bad))
