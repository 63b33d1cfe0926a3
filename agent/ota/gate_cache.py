"""Cache of a model's golden-set outputs and latencies, so the running model is not rerun."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.textio import write_atomic

if TYPE_CHECKING:  # the cache itself needs no runtime: it only reads Measured's fields
    from agent.ota.gate_measure import Measured

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Entries kept (least recently used go first): the running model, the previous one kept for
# rollback and a few refused candidates; each entry is one model's outputs over the golden set.
CACHE_MAX_ENTRIES = 8
# A folder without meta.json this old is a write cut short (a crash), not one in progress.
TORN_ENTRY_AGE_S = 3600.0


@dataclass(frozen=True)
class CachedRun:
    """One model's outputs and per-row latencies over one golden set on one backend."""

    outputs: npt.NDArray[np.float32]
    latencies_s: npt.NDArray[np.float64]
    rss_added_bytes: int
    meta: dict[str, Any]


def cache_key(model_sha256: str, golden_sha256: str, backend_id: str) -> str:
    """The entry name: model bytes + golden set bytes + the backend that produced it."""
    text = f"{model_sha256}\n{golden_sha256}\n{backend_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _npy_bytes(arr: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class BaselineCache:
    """A folder of entries ``<key>/{outputs.npy, latencies_s.npy, meta.json}``.

    meta.json is written last, so an entry without it (a crash mid-write) is a miss. A hit
    touches meta.json, and a store removes the least recently used entries beyond
    ``max_entries``, so a device that gates for months keeps a bounded folder.
    """

    def __init__(self, root: Path, max_entries: int = CACHE_MAX_ENTRIES):
        self.root = root
        self.max_entries = max(1, max_entries)

    def _entry(self, key: str) -> Path:
        return self.root / key

    def load(
        self, model_sha256: str, golden_sha256: str, backend_id: str, rows: int
    ) -> CachedRun | None:
        """The cached run, or None when absent, stale or unreadable (then the model reruns)."""
        entry = self._entry(cache_key(model_sha256, golden_sha256, backend_id))
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
            outputs = np.load(entry / "outputs.npy", allow_pickle=False)
            latencies = np.load(entry / "latencies_s.npy", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("gate cache entry %s unreadable, ignoring it: %s", entry, exc)
            return None
        expected = {
            "format": CACHE_FORMAT,
            "model_sha256": model_sha256,
            "golden_sha256": golden_sha256,
            "backend": backend_id,
        }
        if any(meta.get(k) != v for k, v in expected.items()):
            log.warning("gate cache entry %s does not match its key, ignoring it", entry)
            return None
        if len(outputs) != rows or len(latencies) != rows or outputs.dtype.kind != "f":
            log.warning("gate cache entry %s has the wrong row count, ignoring it", entry)
            return None
        # Recently used, so pruned last; a read-only cache still serves hits.
        with contextlib.suppress(OSError):
            os.utime(entry / "meta.json")
        return CachedRun(
            outputs=outputs.astype(np.float32),
            latencies_s=latencies.astype(np.float64),
            rss_added_bytes=int(meta.get("rss_added_bytes", 0)),
            meta=meta,
        )

    def store(
        self,
        model_sha256: str,
        golden_sha256: str,
        backend_id: str,
        outputs: npt.NDArray[Any],
        latencies_s: npt.NDArray[Any],
        rss_added_bytes: int,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write one entry (files first, meta.json last); returns the entry folder.

        An entry that is already complete is kept: the same model bytes on the same golden
        set and backend give the same outputs, and skipping the rewrite saves the fsyncs."""
        entry = self._entry(cache_key(model_sha256, golden_sha256, backend_id))
        if self.load(model_sha256, golden_sha256, backend_id, len(outputs)) is not None:
            return entry
        write_atomic(entry / "outputs.npy", _npy_bytes(np.asarray(outputs, dtype=np.float32)))
        write_atomic(
            entry / "latencies_s.npy", _npy_bytes(np.asarray(latencies_s, dtype=np.float64))
        )
        meta = {
            "format": CACHE_FORMAT,
            "model_sha256": model_sha256,
            "golden_sha256": golden_sha256,
            "backend": backend_id,
            "rows": len(outputs),
            "rss_added_bytes": int(rss_added_bytes),
            "created_unix_s": time.time(),
            **(extra or {}),
        }
        write_atomic(entry / "meta.json", json.dumps(meta, indent=2).encode())
        self.prune(keep=entry)
        return entry

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used complete entries beyond ``max_entries`` and torn
        entries older than an hour; ``keep`` is never removed. Returns what was removed."""
        complete: list[tuple[float, Path]] = []
        removed: list[Path] = []
        now = time.time()
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir()]
        except OSError:
            return removed
        for folder in folders:
            try:
                complete.append((os.stat(folder / "meta.json").st_mtime, folder))
            except FileNotFoundError:
                try:
                    torn = now - folder.stat().st_mtime > TORN_ENTRY_AGE_S
                except OSError:
                    continue
                if torn and folder != keep:
                    removed.append(folder)
            except OSError:
                continue
        complete.sort(key=lambda item: item[0], reverse=True)
        removed += [folder for _, folder in complete[self.max_entries :] if folder != keep]
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
        if removed:
            log.info("gate cache %s: removed %d old entries", self.root, len(removed))
        return removed


def store_runs(
    cache: BaselineCache,
    golden_keys: tuple[str, str],
    baseline: tuple[str, str | None, Measured, str],
    candidate: tuple[str, str | None, Measured, str],
) -> list[str]:
    """Store this run for next time: the baseline when it ran (its backend id is None when
    it came from the cache), and the candidate, the next gate's baseline once activated.
    Each run is (model sha256, backend id, measured, precision); ``golden_keys`` are the
    golden set's hash for each (with its preprocessing, for raw frames)."""
    stored: list[str] = []
    try:
        for role, golden_key, (sha, backend_id, measured, precision) in (
            ("baseline", golden_keys[0], baseline),
            ("candidate", golden_keys[1], candidate),
        ):
            if backend_id is None or measured.from_cache:
                continue
            cache.store(
                sha,
                golden_key,
                backend_id,
                measured.outputs,
                measured.latencies_s,
                measured.rss_added_bytes,
                {"precision": precision, "role": role},
            )
            stored.append(role)
    except OSError as exc:
        # A full or read-only disk must not turn a gate verdict into a crash.
        log.warning("gate cache %s not written: %s", cache.root, exc)
    return stored
