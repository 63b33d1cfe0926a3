"""Atomic activation on disk: models/<name>-<version>/ and current/previous symlinks."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import PackageError, StateError
from agent.ota.killpoint import kill_point
from agent.textio import fsync_dir, replace_symlink

CURRENT = "current"
PREVIOUS = "previous"
MODELS = "models"


@dataclass(frozen=True)
class Links:
    """Where ``current`` and ``previous`` point (relative names under models/), or None."""

    current: str | None
    previous: str | None

    def to_dict(self) -> dict[str, str | None]:
        return {"current": self.current, "previous": self.previous}


def package_dir_name(name: str, version: str) -> str:
    if not name or "/" in name or name.startswith(".") or "/" in version or not version:
        raise StateError(f"package name {name!r} / version {version!r} cannot name a directory")
    return f"{name}-{version}"


def read_links(state_dir: Path) -> Links:
    return Links(_link_name(state_dir / CURRENT), _link_name(state_dir / PREVIOUS))


def _link_name(link: Path) -> str | None:
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{link}: not a symlink ({exc.strerror})") from None
    return Path(target).name


def resolve(state_dir: Path, which: str = CURRENT) -> Path | None:
    """The package directory a link points to, or None when absent or dangling."""
    name = _link_name(state_dir / which)
    if name is None:
        return None
    path = state_dir / MODELS / name
    return path if path.is_dir() else None


def set_link(state_dir: Path, which: str, dir_name: str | None) -> None:
    """Point ``which`` at models/<dir_name> (or remove it) atomically, then fsync the folder."""
    replace_symlink(
        state_dir / which,
        None if dir_name is None else f"{MODELS}/{dir_name}",
        on_step=lambda step: kill_point(f"install.link_{step}:{which}"),
    )


def restore_links(state_dir: Path, links: Links) -> None:
    """Put both links back to a recorded state (undo of a half-done activation)."""
    set_link(state_dir, PREVIOUS, links.previous)
    set_link(state_dir, CURRENT, links.current)


def place_package(state_dir: Path, extracted_root: Path, dir_name: str) -> Path:
    """Move a verified, extracted package from staging into models/<dir_name>, read-only.

    The move is a rename on one filesystem, so models/ never holds half a package. A
    leftover directory of the same name (an earlier interrupted attempt) is replaced
    unless a link points at it; a linked one is reused only when its manifest is the same
    bytes (same name and version, other bytes: PackageError, or the old files would run
    under the new package's name).
    """
    models = state_dir / MODELS
    models.mkdir(parents=True, exist_ok=True)
    dest = models / dir_name
    links = read_links(state_dir)
    if dest.exists():
        if dir_name in (links.current, links.previous):
            if _manifest_bytes(dest) != _manifest_bytes(extracted_root):
                raise PackageError(
                    f"{dir_name} is already installed with another manifest "
                    "(same name and version, other bytes)"
                )
            return dest
        remove_tree(dest)
    kill_point("install.before_rename")
    os.rename(extracted_root, dest)
    fsync_dir(models)
    kill_point("install.renamed")
    _make_read_only(dest)
    kill_point("install.sealed")
    return dest


def _manifest_bytes(package_dir: Path) -> bytes | None:
    try:
        return (package_dir / "manifest.json").read_bytes()
    except OSError:
        return None


def switch_to(state_dir: Path, dir_name: str) -> Links:
    """Make models/<dir_name> current and the old current previous; returns the old links.

    ``previous`` is written first: a kill between the two steps leaves both links on the
    old model, which still runs.
    """
    old = read_links(state_dir)
    if old.current == dir_name:
        return old
    if old.current is not None:
        set_link(state_dir, PREVIOUS, old.current)
    set_link(state_dir, CURRENT, dir_name)
    return old


def swap_current_previous(state_dir: Path) -> Links:
    """Rollback on disk: previous becomes current and current becomes previous."""
    old = read_links(state_dir)
    if old.previous is None or resolve(state_dir, PREVIOUS) is None:
        raise StateError(f"{state_dir}: no previous model to roll back to")
    set_link(state_dir, CURRENT, old.previous)
    set_link(state_dir, PREVIOUS, old.current)
    return old


def prune_models(state_dir: Path) -> list[str]:
    """Delete package directories no link points at (after a commit); returns their names."""
    models = state_dir / MODELS
    if not models.is_dir():
        return []
    keep = {n for n in read_links(state_dir).to_dict().values() if n}
    removed = []
    for entry in sorted(models.iterdir()):
        if entry.name not in keep:
            remove_tree(entry)
            removed.append(entry.name)
    return removed


def remove_tree(path: Path) -> None:
    """Remove a package directory (its files are read-only; its folders are not)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _make_read_only(root: Path) -> None:
    # Files read-only so nothing edits a verified package in place; folders stay writable
    # by the owner so pruning an old package is a plain rmtree.
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
