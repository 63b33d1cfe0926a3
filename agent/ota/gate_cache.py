"""Cache of a model's golden-set outputs and latencies, so the running model is not rerun."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.textio import write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


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

    meta.json is written last, so an entry without it (a crash mid-write) is a miss.
    """

    def __init__(self, root: Path):
        self.root = root

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
        return entry
