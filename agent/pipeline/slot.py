"""The model slot: the frame loop reads it once per frame, so a hot swap lands between frames."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import PreprocessConfig
from agent.runtime.base import Backend


@dataclass(frozen=True)
class ActiveModel:
    """A loaded, warmed model with everything the loop needs to feed it and read its output."""

    backend: Backend
    name: str
    version: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    labels: tuple[str, ...] = ()
    # the installed package's manifest, or None for a model given by path in the config
    manifest: Mapping[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "backend": self.backend.name,
            "model": os.path.normpath(self.backend.path),
            "from_package": self.manifest is not None,
        }


class ModelSlot:
    """Holds the active model; swap() is atomic with respect to the frame loop."""

    def __init__(self, model: ActiveModel | None = None) -> None:
        self._lock = threading.Lock()
        self._model = model
        self._swaps = 0

    def current(self) -> ActiveModel:
        # A plain attribute read is atomic in CPython; the lock only orders it after swap().
        model = self._model
        if model is None:
            raise LookupError("no model is loaded in the slot")
        return model

    def is_empty(self) -> bool:
        return self._model is None

    def swap(self, new: ActiveModel) -> ActiveModel | None:
        """Put ``new`` in the slot and return the old model (the caller closes it when idle).

        The frame that already read the old model finishes on it; the next frame uses
        ``new``: no frame is dropped or run on a half-swapped model.
        """
        with self._lock:
            old, self._model = self._model, new
            self._swaps += 1
            return old

    @property
    def swaps(self) -> int:
        return self._swaps
