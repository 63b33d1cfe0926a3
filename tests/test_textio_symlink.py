"""textio.replace_symlink: one row per thing found at the link's path, on a real directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import textio
from agent.textio import replace_symlink


@dataclass(frozen=True)
class InTheWay:
    id: str
    found: str  # what the link's path holds before: "link", "dangling", "file", "dir", "none"
    target: str | None  # what the caller asks for (None: remove the link)
    expect: str  # "link" (points at target), "absent", or "refused" (OSError, path untouched)


ROWS = [
    InTheWay("replaces-a-link", "link", "models/new", "link"),
    InTheWay("replaces-a-dangling-link", "dangling", "models/new", "link"),
    InTheWay("replaces-a-regular-file", "file", "models/new", "link"),
    InTheWay("makes-a-missing-link", "none", "models/new", "link"),
    InTheWay("none-removes-a-link", "link", None, "absent"),
    InTheWay("none-removes-a-dangling-link", "dangling", None, "absent"),
    InTheWay("none-with-nothing-there", "none", None, "absent"),
    InTheWay("a-directory-is-refused", "dir", "models/new", "refused"),
]


def _lay_out(root: Path, found: str) -> Path:
    (root / "models" / "old").mkdir(parents=True)
    (root / "models" / "new").mkdir()
    link = root / "current"
    if found == "link":
        link.symlink_to("models/old")
    elif found == "dangling":
        link.symlink_to("models/gone")
    elif found == "file":
        link.write_text("not a link\n")
    elif found == "dir":
        link.mkdir()
        (link / "keep").write_text("x")
    return link


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_replace_symlink(row: InTheWay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = _lay_out(tmp_path, row.found)
    synced: list[Path] = []
    real_fsync_dir = textio.fsync_dir

    def recording_fsync_dir(path: Path) -> None:
        synced.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(textio, "fsync_dir", recording_fsync_dir)
    if row.expect == "refused":
        with pytest.raises(OSError):
            replace_symlink(link, row.target)
        assert link.is_dir() and not link.is_symlink() and (link / "keep").read_text() == "x"
    else:
        replace_symlink(link, row.target)
        if row.expect == "link":
            assert os.readlink(link) == row.target and link.resolve().is_dir()
        else:
            assert not os.path.lexists(link)
        assert synced == [tmp_path]  # the link's folder, once the link is in place
    # no temp link is ever left beside it
    expected = ["models"] if row.expect == "absent" else ["current", "models"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_a_reader_sees_the_old_link_until_the_rename(tmp_path: Path) -> None:
    link = _lay_out(tmp_path, "link")
    seen: list[tuple[str, str]] = []

    def step(name: str) -> None:
        seen.append((name, os.readlink(link)))

    replace_symlink(link, "models/new", on_step=step)
    assert seen == [("tmp", "models/old"), ("replaced", "models/new")]


def test_a_temp_left_by_a_killed_run_with_our_pid_is_replaced(tmp_path: Path) -> None:
    link = _lay_out(tmp_path, "link")
    stale = tmp_path / f".current.link{os.getpid()}"
    stale.symlink_to("models/old")
    replace_symlink(link, "models/new")
    assert os.readlink(link) == "models/new" and not os.path.lexists(stale)


def test_sync_dir_off_fsyncs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = _lay_out(tmp_path, "none")
    synced: list[Path] = []
    monkeypatch.setattr(textio, "fsync_dir", synced.append)
    replace_symlink(link, "models/new", sync_dir=False)
    assert os.readlink(link) == "models/new" and synced == []
