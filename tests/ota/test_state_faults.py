"""State-dir faults on real parts: corrupt files at start, a real full tmpfs under the journal,
polls that change nothing, a bounded journal."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import TelemetryConfig
from agent.errors import EdgeAgentError, StateError
from agent.ota import install
from agent.ota.journal import Journal
from agent.ota.service import (
    LAST_CHECK,
    GateOutcome,
    OTAService,
    load_package_backend,
    recover_at_start,
)
from agent.ota.states import OTAState
from agent.pipeline.slot import ModelSlot

from .conftest import (
    Device,
    feed_frames,
    make_device,
    publish_release,
    release_floor,
    repo_device,
)

# ------------------------------------------------------------------ helpers


def committed_device(tmp: Path, url: str | None = None, www: Path | None = None) -> Device:
    """A device running digits 1.0.0, committed (floor 1); a TUF repo when ``www`` is given."""
    dev = repo_device(tmp, url or "", www) if www is not None else make_device(tmp)
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()
    if www is not None:
        publish_release(dev, www, "1.0.0", 1)  # the channel names what runs
    return dev


def moved(dev: Device, state_dir: Path) -> Device:
    """The same device with its state dir copied to ``state_dir`` (e.g. on a small tmpfs)."""
    shutil.copytree(dev.state_dir, state_dir, symlinks=True)
    cfg = dataclasses.replace(dev.config, state_dir=state_dir)
    return Device(dev.root, state_dir, dev.keys, cfg, dev.packages)


def model_runs(state_dir: Path) -> str:
    """The version ``current`` names, after loading it and checking one finite output."""
    pkg = install.resolve(state_dir, "current")
    assert pkg is not None
    manifest = json.loads((pkg / "manifest.json").read_bytes())
    backend = load_package_backend(pkg, manifest)
    out = backend.run(np.zeros((1, 1, 8, 8), np.float32))[0]
    backend.close()
    assert out.shape == (1, 10) and np.isfinite(out).all()
    return str(manifest["version"])


def telemetry_events(db_path: Path) -> list[tuple[str, dict[str, Any]]]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT name, attrs FROM records WHERE type = 'event' ORDER BY id")
        return [(str(n), json.loads(a)) for n, a in rows]
    finally:
        db.close()


def recorder(tmp: Path) -> Any:
    from agent.telemetry.recorder import TelemetryRecorder

    return TelemetryRecorder(
        TelemetryConfig(enabled=True), "test-device-1", tmp / "telemetry.db", start_uploader=False
    )


# ------------------------------------------------------------------ corrupt files at start


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(6000))


def _bad_pages(path: Path) -> None:
    """Random bytes inside every b-tree page but the first: SQLite opens it, quick_check fails."""
    data = bytearray(path.read_bytes())
    assert len(data) >= 3 * 4096
    for page in range(1, len(data) // 4096):
        # the b-tree page header: 0xff is no page type SQLite knows
        data[page * 4096 : page * 4096 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _truncated_json(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@dataclasses.dataclass(frozen=True)
class CorruptFile:
    id: str
    file: str  # what the fault controls: this file under the state dir, and its bytes
    corrupt: Callable[[Path], None]
    quarantined: bool  # moved aside as <name>.corrupt-<time>
    problem: str | None  # reported (not replaced) with this text


CORRUPT_FILES = [
    CorruptFile("state-db-not-a-database", "state.db", _garbage, True, None),
    CorruptFile("state-db-fails-quick-check", "state.db", _bad_pages, True, None),
    CorruptFile("tuf-timestamp-truncated", "tuf/timestamp.json", _truncated_json, True, None),
    CorruptFile("tuf-snapshot-garbage", "tuf/snapshot.json", _garbage, True, None),
    CorruptFile("tuf-root-truncated", "tuf/root.json", _truncated_json, False, "re-provision"),
    CorruptFile(
        "device-id-binary",
        "device_id",
        lambda p: p.write_bytes(b"\xff\xfe\0\1"),
        False,
        "re-provision",
    ),
]


@pytest.mark.parametrize("row", CORRUPT_FILES, ids=lambda r: r.id)
def test_a_corrupt_file_at_start_is_survived(
    row: CorruptFile, tmp_path: Path, http_dir: tuple[str, Path, dict[str, Any]]
) -> None:
    url, www, _ = http_dir
    dev = committed_device(tmp_path / "dev", url, www)
    svc = dev.service()
    # an up-to-date check leaves timestamp/snapshot/targets.json cached
    assert svc.update_now().reason == "up to date"
    svc.close()
    target = dev.state_dir / row.file
    if row.file == "state.db":
        # one file, no WAL beside it (the last connection closed), as after a clean stop
        assert not Path(f"{target}-wal").exists()
    assert target.exists()
    before = target.read_bytes()
    row.corrupt(target)
    rec = recorder(tmp_path)
    try:
        done = recover_at_start(dev.config, rec)
        rec.flush(10.0)
    finally:
        rec.close()
    kept = sorted(target.parent.glob(f"{target.name}.corrupt-*"))
    events = telemetry_events(tmp_path / "telemetry.db")
    if row.quarantined:
        assert len(kept) == 1 and kept[0].read_bytes() != before
        if row.file == "state.db":
            db = sqlite3.connect(target)
            assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            db.close()
        else:
            assert not target.exists()
        quarantines = [a for n, a in events if n == "ota.quarantine"]
        assert [q["file"] for q in quarantines] == [str(target)]
        assert quarantines[0]["moved_to"] == str(kept[0])
    else:
        assert kept == [] and target.exists()  # never replaced silently
        errors = [a["error"] for n, a in events if n == "error"]
        assert any(row.problem in e and row.file in e for e in errors), errors
    # Inference starts as usual on the verified current model.
    assert done == "nothing in flight"
    assert model_runs(dev.state_dir) == "1.0.0"
    svc = dev.service()
    try:
        last = svc.journal.last()
        assert last is not None and last.state is OTAState.COMMITTED and last.version == "1.0.0"
        assert release_floor(dev) == 1
        if row.file == "state.db":
            assert "rebuilt from the links" in last.reason and kept[0].name in last.reason
            assert svc.journal.rows() == 1
        if row.file == "tuf/root.json":
            with pytest.raises(StateError, match="re-provision"):
                svc.update_now()
        else:
            # the device still follows its channel (a dropped timestamp/snapshot is fetched again)
            assert svc.update_now().reason == "up to date"
    finally:
        svc.close()


def test_a_rebuilt_journal_still_refuses_a_replayed_release(tmp_path: Path) -> None:
    dev = committed_device(tmp_path)
    svc = dev.service()
    svc.install_file(dev.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    feed_frames(svc, 20)
    svc.close()
    _garbage(dev.state_dir / "state.db")
    recover_at_start(dev.config)
    assert release_floor(dev) == 2  # from the active manifest's release_counter
    svc = dev.service()
    try:
        with pytest.raises(EdgeAgentError, match=r"not above the floor|below"):
            svc.install_file(dev.package("1.0.5", 2))
        assert model_runs(dev.state_dir) == "1.1.0"
    finally:
        svc.close()


# ------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (needs root and mount rights, else skipped)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC; returns it (unlink to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


@dataclasses.dataclass(frozen=True)
class FullDisk:
    id: str
    fills_at: str  # what the fault controls: the moment the disk becomes full
    left: OTAState  # the row the failed step leaves behind


FULL_DISK = [
    FullDisk("during-download", "the package download starts", OTAState.DOWNLOADING),
    FullDisk("during-gate", "the gate runs", OTAState.GATING),
    FullDisk("at-commit", "probation ends", OTAState.PROBATION),
]


@pytest.mark.parametrize("row", FULL_DISK, ids=lambda r: r.id)
def test_a_full_disk_never_wedges_ota(
    row: FullDisk,
    tmp_path: Path,
    small_disk: Path,
    http_dir: tuple[str, Path, dict[str, Any]],
) -> None:
    url, www, faults = http_dir
    dev = moved(committed_device(tmp_path / "dev", url, www), small_disk / "state")
    publish_release(dev, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
    filled: list[Path] = []

    def fill_once() -> None:
        if not filled:
            filled.append(fill(small_disk))

    def gate(_base: Path, _cand: Path, _manifest: Any) -> GateOutcome:
        if row.fills_at == "the gate runs":
            fill_once()
        return GateOutcome(True, {}, "gate passed")

    if row.fills_at == "the package download starts":
        faults["on_get"] = lambda path: "/targets/packages/" in path and fill_once()
    # a slot, as in a daemon: probation is watched in-process
    svc = OTAService(dev.config, slot=ModelSlot(), gate=gate)
    try:
        with pytest.raises((EdgeAgentError, OSError)), svc.step():
            svc.update_now()
            if row.fills_at == "probation ends":
                fill_once()
                feed_frames(svc, 20)
        assert filled, "the disk never filled"
        last = svc.journal.last()
        assert last is not None
        if last.state is not row.left:
            # the failed step's own way out could write again (SQLite reuses the WAL pages
            # of the rolled-back write): it cleared its own row already
            before = svc.journal.history(limit=2)[0]
            assert before.state is row.left and last.state is OTAState.IDLE, (before, last)
            assert "failed write" in last.reason
        # else the failed write left the step's row behind (what wedged OTA before)
        # Still full: the next poll fails plainly, never on the transition table.
        try:
            with svc.step():
                svc.update_now()
        except EdgeAgentError as exc:
            assert "is not allowed" not in str(exc)
        # Freed: the next poll clears the stale row and the update goes through.
        filled[0].unlink()
        with svc.step():
            svc.update_now()
        if svc.journal.state() is OTAState.PROBATION:
            feed_frames(svc, 20)
        last = svc.journal.last()
        assert last is not None and last.state is OTAState.COMMITTED, last
        assert install.read_links(dev.state_dir).current == "digits-1.1.0"
        assert release_floor(dev) == 2
    finally:
        svc.close()
    assert model_runs(dev.state_dir) == "1.1.0"


# ------------------------------------------------------------------ polls that change nothing


def test_polls_that_change_nothing_are_not_journaled(
    tmp_path: Path, http_dir: tuple[str, Path, dict[str, Any]]
) -> None:
    url, www, _ = http_dir
    dev = committed_device(tmp_path / "dev", url, www)  # the channel names what runs
    rec = recorder(tmp_path)
    svc = dev.service(recorder=rec)
    try:
        rows = svc.journal.rows()
        for _ in range(5):
            with svc.step():
                assert svc.update_now().reason == "up to date"
        assert svc.journal.rows() == rows
        stored = json.loads(svc.journal.get_value(LAST_CHECK) or "{}")
        assert stored["ok"] is True and stored["outcome"] == "up to date"
        assert stored["version"] == "1.0.0"
        rec.flush(10.0)
        assert [n for n, _ in telemetry_events(tmp_path / "telemetry.db")] == []
        # a real release is journaled as before
        publish_release(dev, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
        with svc.step():
            svc.update_now()
        states = [e.state.value for e in svc.journal.history()][-6:]
        assert states == [
            "CHECKING",
            "DOWNLOADING",
            "VERIFYING",
            "GATING",
            "ACTIVATING",
            "PROBATION",
        ]
        rec.flush(10.0)
        events = [
            a["state"] for n, a in telemetry_events(tmp_path / "telemetry.db") if n == "ota.state"
        ]
        assert events == states
    finally:
        svc.close()
        rec.close()


def test_the_journal_is_bounded_and_keeps_what_status_shows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state.db", keep_rows=50)
    try:
        journal.enter(OTAState.VERIFYING, package="digits", version="1.0.0")
        journal.enter(OTAState.GATING)
        journal.enter(OTAState.ACTIVATING)
        journal.enter(OTAState.PROBATION)
        committed = journal.enter(OTAState.COMMITTED, reason="probation passed")
        refused = None
        for n in range(200):
            journal.enter(OTAState.VERIFYING, package="digits", version=f"2.0.{n}")
            refused = journal.enter(OTAState.REJECTED, reason=f"gate failed {n}")
        assert refused is not None
        assert journal.rows() <= 50 + 1
        assert journal.last_in((OTAState.COMMITTED,)) == committed
        assert journal.last_in((OTAState.REJECTED,)) == refused
        assert journal.last() == refused
    finally:
        journal.close()


def test_status_shows_the_at_rest_state_and_the_last_check(
    tmp_path: Path, http_dir: tuple[str, Path, dict[str, Any]]
) -> None:
    from agent.commands.daemon import format_ota
    from agent.commands.ota import ota_status

    url, www, _ = http_dir
    dev = committed_device(tmp_path / "dev", url, www)
    svc = dev.service()
    try:
        with pytest.raises(EdgeAgentError, match="gate failed"):
            svc.install_file(dev.package("1.2.0", 3, _broken()))
        svc.update_now()
    finally:
        svc.close()
    ota = ota_status(dev.state_dir)
    assert ota["active"]["state"] == "COMMITTED" and ota["active"]["live_version"] == "1.0.0"
    assert ota["last_outcome"]["state"] == "REJECTED" and ota["last_outcome"]["version"] == "1.2.0"
    assert ota["last_check"]["outcome"] == "up to date" and ota["in_flight"] is None
    lines = format_ota(ota)
    assert lines[0].startswith("ota:        active 1.0.0 COMMITTED (")
    assert lines[1].startswith("update:     REJECTED digits 1.2.0 (gate failed")
    assert lines[2].startswith("checked:    ") and lines[2].endswith("up to date")


def _broken() -> bytes:
    from .conftest import broken_digits_model

    return broken_digits_model()


def test_a_rollback_whose_row_cannot_be_saved_is_recorded_by_the_next_step(
    tmp_path: Path, small_disk: Path
) -> None:
    dev = moved(committed_device(tmp_path / "dev"), small_disk / "state")
    svc = OTAService(dev.config, slot=ModelSlot())
    try:
        svc.install_file(dev.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
        feed_frames(svc, 20)
        assert svc.journal.state() is OTAState.COMMITTED
        filler = fill(small_disk)
        # the links switch (a symlink needs no data block) but ROLLED_BACK cannot be saved
        with pytest.raises(StateError), svc.step():
            svc.rollback("operator asked")
        assert install.read_links(dev.state_dir).current == "digits-1.0.0"
        last = svc.journal.last()
        assert last is not None and (last.state, last.version) in {
            (OTAState.COMMITTED, "1.1.0"),  # the journal contradicts the links ...
            (OTAState.ROLLED_BACK, "1.1.0"),  # ... or the step's way out recorded it
        }
        filler.unlink()
        with svc.step():
            pass  # the next step (a poll, say) makes the journal agree with the links
        last = svc.journal.last()
        assert last is not None and last.state is OTAState.ROLLED_BACK
        assert (last.version, last.from_version) == ("1.1.0", "1.0.0")
    finally:
        svc.close()
    # a restart agrees too
    assert recover_at_start(dev.config) == "nothing in flight"
    assert model_runs(dev.state_dir) == "1.0.0"
