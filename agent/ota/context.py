"""ServiceContext: the state and helpers every part of the OTA service shares."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import DowngradeError
from agent.ota import install
from agent.ota.gate_process import GateOutcome, remove_stale_gate_files
from agent.ota.host import ModelHost, SlotHost
from agent.ota.journal import Journal, JournalEntry
from agent.ota.package_reader import PackageReader, read_package_default
from agent.ota.probation import ProbationPolicy, ProbationWatch
from agent.ota.states import OTAEvent, OTAState, next_state
from agent.package import ReleaseFloor
from agent.pipeline.slot import ActiveModel
from agent.runtime.base import Backend
from agent.telemetry.identity import resolve_device_id

log = logging.getLogger(__name__)

# the live model's recent confidences kept for probation's baseline (agent/ota/probation.py)
LIVE_CONFIDENCE_KEEP = 512
STAGING_EXTRACT_PREFIX = "extract-"

# The edges that belong to other parts; injectable so tests and tools can swap them.
GateRunner = Callable[[Path, Path, Mapping[str, Any]], GateOutcome]
BackendLoader = Callable[[Path, Mapping[str, Any]], Backend]


def load_package_backend(
    package_dir: Path, manifest: Mapping[str, Any], config: AgentConfig | None = None
) -> Backend:
    """Load the model of an installed/extracted package with the runtime its manifest names
    and ``config.model``'s backend options (the model seam's loader; defaults without one)."""
    from agent.pipeline import model

    return model.load_package_backend(config or AgentConfig(), package_dir, manifest)


@dataclass
class ServiceContext:
    """What every part of the OTA service shares: config, journal, lock, host, loads, events."""

    config: AgentConfig
    recorder: Any = None
    slot: Any = None
    host: ModelHost | None = None
    read_package: PackageReader = read_package_default
    gate: GateRunner | None = None
    # None: the model seam's loader with config.model's backend options (load_with_config);
    # tests and tools may inject their own
    load_model: BackendLoader | None = None
    system_clock: Callable[[], float] = time.time
    # probation's clock: monotonic, so a wall-clock jump neither freezes nor ends it
    monotonic_clock: Callable[[], float] = time.monotonic
    probation_policy: ProbationPolicy | None = None
    _watch: ProbationWatch | None = field(default=None, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    # operations (poll, install, rollback) running in this process; see step()
    _busy: int = field(default=0, init=False)
    _busy_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_check: dict[str, Any] | None = field(default=None, init=False)
    # set when the agent stops: a download or a gate in progress ends at once, at rest
    stopping: threading.Event = field(default_factory=threading.Event, init=False)
    # "name version" of the package in the gate (the gate runs without the lock)
    _gating: str | None = field(default=None, init=False)
    # the running shadow evaluation (agent/ota/shadow_run.py ShadowRun), None when none
    _shadow: Any = field(default=None, init=False)
    # the live model's confidences while no probation runs: the old model's baseline
    _live_confidences: deque[float] = field(
        default_factory=lambda: deque(maxlen=LIVE_CONFIDENCE_KEEP), init=False
    )

    def __post_init__(self) -> None:
        self.state_dir = self.config.state_dir
        self.staging_dir = self.state_dir / "staging"
        self.journal = Journal(self.state_dir / "state.db")
        ota = self.config.ota
        if self.probation_policy is None:
            self.probation_policy = ProbationPolicy(
                min_frames=ota.probation_frames, min_s=ota.probation_s
            )
        if self.load_model is None:
            self.load_model = self.load_with_config
        if self.host is None and self.slot is not None:
            self.host = SlotHost(self.slot, self.config)
        self._migrate_release_marks()

    def _release_floor(self) -> ReleaseFloor:
        # Opened per use: ReleaseFloor's SQLite connection belongs to the thread that made
        # it, and the service runs on the poll thread and the control-socket threads.
        return ReleaseFloor(self.state_dir / "state.db")

    def release_floor(self, name: str) -> int:
        """The committed release_counter floor for ``name`` (0 when none was committed)."""
        with self._release_floor() as floor:
            return floor.get(name) or 0

    def _check_floor(self, name: str, version: str, counter: int, reverting: bool) -> None:
        """DowngradeError unless ``counter`` is above the floor (or the channel signed a revert).

        The package area's floor refuses a lower counter; an equal one is also refused
        here: it is the committed release itself or a re-signed twin of it.
        """
        with self._release_floor() as floor:
            floor.check(name, counter, allow_revert=reverting)
            value = floor.get(name)
        if value is not None and counter == value and not reverting:
            if self.current_version() == version:
                raise DowngradeError(f"{name} {version} is already installed")
            raise DowngradeError(
                f"{name} {version}: release_counter {counter} is not above the floor "
                f"{value} (older or replayed release)"
            )

    def _migrate_release_marks(self) -> None:
        """Move floors an older agent kept as journal marks (release.<name>) to ReleaseFloor."""
        old = self.journal.marks(prefix="release.")
        if not old:
            return
        with self._release_floor() as floor:
            for mark, value in old.items():
                floor.raise_to(mark[len("release.") :], value, "")
        for mark in old:
            self.journal.delete_mark(mark)

    def close(self) -> None:
        self._stop_shadow()
        self.journal.close()

    def _model_config(self) -> AgentConfig:
        # the running host's config, so a reload's new threads/providers apply to the
        # next install or rollback too
        return self.host.config if self.host is not None else self.config

    def load_with_config(self, package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
        """The default ``load_model``: the model seam's loader with config.model's options."""
        return load_package_backend(package_dir, manifest, self._model_config())

    def _load_backend(self, package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
        """Every in-process OTA model load (activation, rollback, offline probation)."""
        assert self.load_model is not None  # set in __post_init__
        return self.load_model(package_dir, manifest)

    def _load_for_gate(self, source: Path) -> Backend:
        """A package dir or the configured model file, loaded as the daemon would run it
        (what the gate's child process does for both models)."""
        from agent.pipeline.model import load_source_backend, read_manifest

        if source.is_dir():
            return self._load_backend(source, read_manifest(source))
        return load_source_backend(self._model_config(), source)

    def _live_model(
        self,
        backend: Backend,
        package_dir: Path,
        manifest: Mapping[str, Any],
        probed: bool = True,
    ) -> ActiveModel:
        """``backend`` as a runnable model (task, thresholds, preprocessing and labels from
        its manifest: the model seam), proven on one probe frame of the configured source
        unless ``probed`` is False; closes the backend when either fails.

        With ``host.swap_in`` this is the one hot-swap path, for installs and rollbacks.
        """
        from agent.pipeline.model import package_model, probe, probe_frame

        try:
            model = package_model(backend, package_dir, manifest)
            if probed:
                recent = self.host.recent_frame() if self.host is not None else None
                probe(model, probe_frame(self._model_config().source, model, recent))
        except BaseException:
            backend.close()
            raise
        return model

    def _emit(self, entry: JournalEntry) -> None:
        attrs: dict[str, Any] = {
            "state": entry.state.value,
            "package": entry.package,
            "version": entry.version,
            "from_version": entry.from_version,
            "reason": entry.reason,
            "channel": entry.channel,
        }
        quality = entry.detail.get("quality") if isinstance(entry.detail, Mapping) else None
        if isinstance(quality, Mapping):
            # the shared contract (docs/CONTRACTS.md): flat quality.<name> number attributes
            for name, value in quality.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attrs[f"quality.{name}"] = value
        log.info("OTA %s %s %s: %s", entry.state.value, entry.package, entry.version, entry.reason)
        if self.recorder is not None:
            try:
                self.recorder.event("ota.state", attrs)
            except Exception as exc:  # telemetry must never stop an update
                log.warning("telemetry event failed: %s", exc)

    def _enter(self, state: OTAState, **kwargs: Any) -> JournalEntry:
        """Journal ``state`` (the journal checks the move) and send its event."""
        entry = self.journal.enter(state, **kwargs)
        self._emit(entry)
        return entry

    def fire(self, event: OTAEvent, **kwargs: Any) -> JournalEntry:
        """Move the journal to the state FLOW (agent/ota/states.py) names for ``event`` in
        the journal's current state; StateError naming both when FLOW has no such move."""
        return self._enter(next_state(self.journal.state(), event), **kwargs)

    def device_id(self) -> str:
        """The id rollout membership hashes; the daemon's telemetry uses the same function
        (config ``device_id``, else the provisioned ``state_dir/device_id``, else a hash of
        /etc/machine-id), so the fleet counts a device under the id it rolls out to."""
        return resolve_device_id(self.config.device_id, self.state_dir)

    def current_manifest(self, which: str = install.CURRENT) -> Mapping[str, Any] | None:
        pkg_dir = install.resolve(self.state_dir, which)
        if pkg_dir is None:
            return None
        try:
            data: Mapping[str, Any] = json.loads((pkg_dir / "manifest.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data

    def current_version(self) -> str:
        manifest = self.current_manifest()
        return str(manifest["version"]) if manifest else ""

    def _keyring_dir(self) -> Path:
        return self.state_dir / "keyring"

    def _record_refusal(self, entry: JournalEntry, reason: str) -> None:
        channel_key = str(entry.detail.get("channel_key", "local"))
        self.journal.record_refusal(entry.package, entry.version, channel_key, reason)

    def _clean_staging_extracts(self) -> None:
        if not self.staging_dir.is_dir():
            return
        for entry in self.staging_dir.iterdir():
            if entry.name.startswith(STAGING_EXTRACT_PREFIX):
                install.remove_tree(entry)
        # a kill mid-gate left the gate's request and stderr files; one per kill, for ever
        remove_stale_gate_files(self.staging_dir)

    def _attach_shadow(self, run: Any) -> bool:
        set_shadow = getattr(self.host, "set_shadow", None)
        if set_shadow is None or not set_shadow(run.offer):
            return False
        run.start()
        self._shadow = run
        return True

    def _stop_shadow(self) -> None:
        run, self._shadow = self._shadow, None
        if run is None:
            return
        set_shadow = getattr(self.host, "set_shadow", None)
        if set_shadow is not None:
            set_shadow(None)
        run.close()

    def gating(self) -> str | None:
        """The package in the gate ("name version"), None when no gate runs."""
        return self._gating
