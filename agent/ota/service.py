"""OTAService: check, download, verify, gate, activate, probation and rollback, journaled."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.config import AgentConfig
from agent.errors import (
    ConfigError,
    DowngradeError,
    EdgeAgentError,
    FetchError,
    GateFailedError,
    ModelError,
    OTAError,
    PackageError,
    RefusedError,
    RepositoryError,
    StateError,
)
from agent.ota import install
from agent.ota.channel import (
    ChannelClient,
    ChannelDocument,
    ChannelNotPublishedError,
    LastKnownGoodClock,
)
from agent.ota.download import TargetRef, download_target
from agent.ota.fetch import FetchLimits, HttpFetcher
from agent.ota.gate_process import (
    GateLimits,
    GateOutcome,
    GateRequest,
    GateStopped,
    remove_stale_gate_files,
    run_gate_child,
)
from agent.ota.host import LiveLatency, ModelHost, SlotHost
from agent.ota.journal import LAST_CHECK, LAST_GATE_REPORT, LAST_POLL, Journal, JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.membership import in_rollout, poll_delay_s, rollout_bucket
from agent.ota.probation import (
    Baseline,
    ProbationPolicy,
    ProbationResult,
    ProbationWatch,
    Verdict,
)
from agent.ota.quarantine import Quarantined, StartCheck, check_state_dir, check_tuf_root
from agent.ota.recovery import Facts as RecoveryFacts
from agent.ota.recovery import Plan as RecoveryPlan
from agent.ota.recovery import Step as RecoveryStep
from agent.ota.recovery import plan_recovery
from agent.ota.shadow import ShadowPolicy, ShadowVerdict
from agent.ota.states import AT_REST, RECOVERY, OTAState, Recovery
from agent.package import ReleaseFloor, check_compat
from agent.pipeline.slot import ActiveModel
from agent.runtime import installed_runtimes
from agent.runtime.base import Backend
from agent.telemetry.identity import resolve_device_id

log = logging.getLogger(__name__)

# journal values "gate_quality:<name>-<version>": the golden histograms and gate margin
GATE_QUALITY_PREFIX = "gate_quality:"

# journal value: the seq of an in-flight row the agent left on a clean stop (not a crash)
CLEAN_STOP = "clean_stop_seq"
# how long a stop waits for the poll thread to bring a download or gate to rest
STOP_JOIN_S = 5.0
# the live model's recent confidences kept for probation's baseline (agent/ota/probation.py)
LIVE_CONFIDENCE_KEEP = 512
STAGING_EXTRACT_PREFIX = "extract-"


@dataclass(frozen=True)
class ExtractedPackage:
    """A package whose signatures, files and hashes were checked, extracted under staging/."""

    root: Path
    manifest: Mapping[str, Any]
    model_path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def release_counter(self) -> int:
        return int(self.manifest.get("release_counter", 0))


# Runs on the verified manifest (agent.package.Manifest) before any file is extracted.
ManifestCheck = Callable[[Any], None]


class PackageReader(Protocol):
    """Verify a package tar with the keyring, run ``check_manifest``, extract into staging."""

    def __call__(
        self,
        tar_path: Path,
        keyring_dir: Path,
        staging_dir: Path,
        check_manifest: ManifestCheck | None = None,
    ) -> ExtractedPackage: ...


# The edges that belong to other parts; injectable so tests and tools can swap them.
GateRunner = Callable[[Path, Path, Mapping[str, Any]], GateOutcome]
BackendLoader = Callable[[Path, Mapping[str, Any]], Backend]


def read_package_default(
    tar_path: Path,
    keyring_dir: Path,
    staging_dir: Path,
    check_manifest: ManifestCheck | None = None,
) -> ExtractedPackage:
    """Verify + extract with the package area's reader; ``check_manifest`` (compat, floor)
    runs on the verified manifest before any file data is written."""
    from agent.package import Keyring, read_package

    verified = read_package(
        tar_path, Keyring.load(keyring_dir), staging_dir, check_manifest=check_manifest
    )
    root = Path(verified.root)
    manifest = json.loads((root / "manifest.json").read_bytes())
    model = root / str(manifest.get("runtime", {}).get("model", "model.onnx"))
    return ExtractedPackage(root=root, manifest=manifest, model_path=model)


def load_package_backend(
    package_dir: Path, manifest: Mapping[str, Any], config: AgentConfig | None = None
) -> Backend:
    """Load the model of an installed/extracted package with the runtime its manifest names
    and ``config.model``'s backend options (the model seam's loader; defaults without one)."""
    from agent.pipeline import model

    return model.load_package_backend(config or AgentConfig(), package_dir, manifest)


@dataclass(frozen=True)
class CheckResult:
    """What a channel check decided."""

    take: bool
    reason: str
    document: ChannelDocument | None = None
    bucket: int | None = None
    package_ref: TargetRef | None = None
    # the channel lists the running version in revert_versions: roll back locally
    rollback: bool = False

    def to_dict(self) -> dict[str, Any]:
        doc = self.document
        return {
            "take": self.take,
            "reason": self.reason,
            "channel": doc.channel if doc else None,
            "version": doc.version if doc else None,
            "percent": doc.percent if doc else None,
            "bucket": self.bucket,
        }


@dataclass
class OTAService:
    """The device side of OTA; one per state directory.

    ``host`` (a ModelHost, agent/ota/host.py: the daemon, or a SlotHost over a bare
    ``slot``) is set when a model runs: activation then loads and warms the new model
    beside the live one and the host swaps it in between two frames. Without either, an
    install only moves the links (the next start loads the new model).
    """

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

    # ------------------------------------------------------------------ release floor

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

    # ------------------------------------------------------------------ model loads

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

    # ------------------------------------------------------------------ events

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
        entry = self.journal.enter(state, **kwargs)
        self._emit(entry)
        return entry

    # ------------------------------------------------------------------ queries

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

    # ------------------------------------------------------------------ start-up

    def recover(self, agent_start: bool = True) -> str:
        """Finish or undo whatever the journal says was in flight; returns what was done.

        ``agent_start`` is False for a CLI command: it does not count as a restart of the
        agent for the crash-loop breaker.
        """
        with self._lock:
            kill_point("recover.start")
            last = self.journal.last()
            self._clean_staging_extracts()
            if last is not None and last.state is OTAState.COMMITTED:
                # A kill between the COMMITTED row and the floor raise must not leave the
                # floor low (a replayed older release would then pass).
                self._finish_commit(last)
            switch = None
            if last is None or last.state in AT_REST or last.state is OTAState.PROBATION:
                switch = self._silent_switch(last)
            key = f"attempts:{last.package}-{last.version}" if last is not None else ""
            plan = plan_recovery(
                RecoveryFacts(
                    state=last.state if last is not None else None,
                    version=last.version if last is not None else "",
                    restarts=int(last.detail.get("restarts", 0)) if last is not None else 0,
                    attempts=int(self.journal.get_value(key) or 0) if key else 0,
                    clean_stop=last is not None
                    and self.journal.get_value(CLEAN_STOP) == str(last.seq),
                    silent_switch=switch is not None,
                    agent_start=agent_start,
                    crash_loop_limit=self.config.ota.crash_loop_limit,
                )
            )
            self._carry_out(plan, last, switch, key)
            return plan.step.value

    def _carry_out(
        self,
        plan: RecoveryPlan,
        last: JournalEntry | None,
        switch: dict[str, str] | None,
        attempts_key: str,
    ) -> None:
        """Do what plan_recovery decided (agent/ota/recovery.py), in the journal and links."""
        if plan.step is RecoveryStep.RECORD_ROLLBACK:
            assert switch is not None
            self._enter(OTAState.ROLLED_BACK, **switch)
            return
        if last is None or plan.next_state is None:
            return  # nothing to write (nothing in flight, or a CLI during probation)
        if plan.attempts is not None:
            self.journal.set_value(attempts_key, str(plan.attempts))
        if plan.step is RecoveryStep.CRASH_LOOP_ROLLBACK:
            self.rollback(plan.reason, automatic=True)
            return
        if plan.step is RecoveryStep.UNDO_ACTIVATION:
            before = last.detail.get("links_before") or {}
            install.restore_links(
                self.state_dir,
                install.Links(before.get("current"), before.get("previous")),
            )
        detail = {"restarts": plan.restarts} if plan.restarts is not None else None
        self._enter(plan.next_state, reason=plan.reason, detail=detail)
        if plan.refuse is not None:
            self._record_refusal(last, plan.refuse)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One OTA operation (a poll, an install, a rollback) of this process.

        A step that failed on a journal write (disk full, I/O error) may leave its
        in-flight row behind; no other operation of this process owns it then, so the
        next step to start (the next poll, say) clears it first (``clear_stale``) instead
        of failing on "CHECKING -> CHECKING is not allowed" forever. A failed step also
        tries to clear its own row on the way out.
        """
        with self._busy_lock:
            if self._busy == 0:
                self.clear_stale()
            self._busy += 1
        try:
            yield
        except BaseException:
            with self._busy_lock:
                self._busy -= 1
                if self._busy == 0:
                    try:
                        self.clear_stale()
                    except EdgeAgentError as exc:  # still failing: the next step tries again
                        log.warning("OTA: cannot clear the failed step yet: %s", exc)
            raise
        with self._busy_lock:
            self._busy -= 1

    def clear_stale(self) -> str:
        """Undo an in-flight row that no running operation of this process owns.

        Like recover(), but not a restart: nothing counts toward the crash-loop breaker
        or a version's interruption count (a full disk is not the package's fault).
        Returns what was done.
        """
        with self._lock:
            last = self.journal.last()
            if last is None:
                return "nothing in flight"
            if last.state is OTAState.COMMITTED:
                self._redo_commit_tail(last)
            resting = last.state in AT_REST or last.state is OTAState.PROBATION
            if resting and self._record_silent_switch(last):
                return "rollback recorded"
            if last.state in AT_REST:
                return "nothing in flight"
            if last.state is OTAState.PROBATION:
                if self._watch is None and self.host is not None:
                    # the commit or rollback that ended the watch failed to save: judge again
                    self._start_watch(last)
                    return "probation watch re-armed"
                return "probation in progress"
            self._clean_staging_extracts()
            action = RECOVERY[last.state]
            if action is Recovery.UNDO_ACTIVATION:
                before = last.detail.get("links_before") or {}
                install.restore_links(
                    self.state_dir, install.Links(before.get("current"), before.get("previous"))
                )
                self._reload_current_into_slot()
                self._enter(
                    OTAState.ROLLED_BACK,
                    reason="activation failed to save its state; links restored",
                )
                return "activation undone"
            self._enter(
                OTAState.IDLE,
                reason=f"{last.state.value} ended by a failed write in this process; will retry",
            )
            return "abandoned"

    def _record_silent_switch(self, last: JournalEntry | None) -> bool:
        """Journal a rollback whose link switch landed but whose ROLLED_BACK row did not
        (killed, or the write failed on a full disk), so the journal agrees with the links.

        The journal's live version (PROBATION's, COMMITTED's, or a ROLLED_BACK's
        from_version) is then ``previous`` and ``current`` names another version.
        """
        switch = self._silent_switch(last)
        if switch is None:
            return False
        self._enter(OTAState.ROLLED_BACK, **switch)
        return True

    def _silent_switch(self, last: JournalEntry | None) -> dict[str, str] | None:
        """The ROLLED_BACK row's fields when the links show an unjournaled rollback, else None
        (reads only: see _record_silent_switch)."""
        if last is None:
            return None
        made_live = (
            last
            if last.state is OTAState.PROBATION
            else self.journal.last_in((OTAState.COMMITTED, OTAState.ROLLED_BACK))
        )
        if made_live is None:
            return None
        live = (
            made_live.from_version if made_live.state is OTAState.ROLLED_BACK else made_live.version
        )
        current = self.current_version()
        previous = str((self.current_manifest(install.PREVIOUS) or {}).get("version", ""))
        if not live or not current or live == current or previous != live:
            return None
        return {
            "package": made_live.package,
            "version": live,
            "from_version": current,
            "reason": f"links were switched back to {current} without a journal row "
            "(rollback interrupted); recorded now",
        }

    def _redo_commit_tail(self, entry: JournalEntry) -> None:
        """A COMMITTED whose floor raise failed (disk full) is finished by the next step."""
        counter = entry.detail.get("release_counter")
        if (
            entry.package
            and isinstance(counter, int)
            and self.release_floor(entry.package) < counter
        ):
            self._finish_commit(entry)

    def _reload_current_into_slot(self) -> None:
        """After links were restored in a running daemon: run what ``current`` names again."""
        if self.host is None:
            return
        live = self.slot.current() if self.slot is not None and not self.slot.is_empty() else None
        manifest = self.current_manifest()
        pkg_dir = install.resolve(self.state_dir, install.CURRENT)
        if manifest is None or pkg_dir is None:
            return
        if live is not None and getattr(live, "version", None) == manifest.get("version"):
            return
        backend = self._load_backend(pkg_dir, manifest)
        try:
            backend.warmup(max(1, self.config.model.warmup_runs))
        except BaseException:
            backend.close()
            raise
        # no probe: this model ran here before the interrupted activation
        self.host.swap_in(self._live_model(backend, pkg_dir, manifest, probed=False))

    def rebuild_from_links(self, quarantined: Quarantined | None = None) -> str:
        """Seed a fresh journal from the ``current`` link after state.db was quarantined.

        The active package's manifest must verify against the keyring (signatures and
        file hashes); its release_counter becomes the floor and the journal rests in
        COMMITTED for it. Without a verified current package the journal stays empty.
        """
        from agent.package import Keyring, load_installed

        where = f" (old file kept as {quarantined.moved_to.name})" if quarantined else ""
        pkg_dir = install.resolve(self.state_dir, install.CURRENT)
        if pkg_dir is None:
            return "no current package: empty journal" + where
        try:
            keyring = Keyring.load(self._keyring_dir())
            manifest = load_installed(pkg_dir, keyring, check_files=True)
        except EdgeAgentError as exc:
            log.error("state.db rebuild: current package %s does not verify: %s", pkg_dir, exc)
            return f"current package does not verify ({exc}): empty journal" + where
        with self._release_floor() as floor:
            floor.raise_to(manifest.name, manifest.release_counter, manifest.version)
        entry = self.journal.seed(
            OTAState.COMMITTED,
            package=manifest.name,
            version=manifest.version,
            reason="state.db rebuilt from the links" + where,
            detail={"release_counter": manifest.release_counter, "rebuilt": True},
        )
        self._emit(entry)
        return (
            f"journal rebuilt: {manifest.name} {manifest.version} COMMITTED, floor "
            f"{manifest.release_counter}" + where
        )

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

    # ------------------------------------------------------------------ install

    def install_file(self, tar_path: Path, channel: ChannelDocument | None = None) -> JournalEntry:
        """Verify -> compat -> gate -> activate one package file; ends in PROBATION.

        A refusal is journaled (REJECTED, with the reason), recorded so the same version
        is not retried until the channel changes, and re-raised for the caller.
        """
        with self._lock:
            if self._gating is not None:
                raise StateError(
                    f"OTA: {self._gating} is in the gate; install again after it finishes"
                )
            channel_key = channel.fingerprint if channel else "local"
            from_version = self.current_version()
            self._enter(
                OTAState.VERIFYING,
                package=channel.package if channel else "",
                version=channel.version if channel else "",
                from_version=from_version,
                channel=channel.channel if channel else "",
                reason=f"verifying {tar_path.name}",
                detail={"channel_key": channel_key, "file": str(tar_path)},
            )
            extract_dir = self.staging_dir / f"{STAGING_EXTRACT_PREFIX}{time.time_ns()}"
            # Filled by the manifest check, so a refusal before extraction still names
            # the package and version it refused.
            seen: dict[str, str] = {}

            def check_manifest(manifest: Any) -> None:
                seen.update(package=manifest.name, version=manifest.version)
                self._check_manifest(manifest, channel)

            try:
                extract_dir.mkdir(parents=True)
                pkg = self.read_package(
                    tar_path,
                    self._keyring_dir(),
                    extract_dir,
                    check_manifest=check_manifest,
                )
                kill_point("verify.extracted")
                self._check_release(pkg, channel)
            except RefusedError as exc:
                self._refuse(
                    str(exc), channel_key, package=seen.get("package"), version=seen.get("version")
                )
                raise
            except OSError as exc:
                install.remove_tree(extract_dir)
                reason = f"cannot extract {tar_path.name}: {exc.strerror or exc}"
                self._enter(OTAState.IDLE, reason=reason)
                raise OTAError(f"{tar_path}: {reason}") from None
            except EdgeAgentError as exc:
                install.remove_tree(extract_dir)
                self._enter(OTAState.IDLE, reason=str(exc))
                raise
            # marked before the row is saved, so a stop that sees GATING also waits for it
            self._gating = f"{pkg.name} {pkg.version}"
            try:
                gating = self._enter(
                    OTAState.GATING,
                    package=pkg.name,
                    version=pkg.version,
                    reason="running the golden-set gate",
                )
            except BaseException:
                self._gating = None
                raise
        # The gate runs without the lock (in a child process by default), so status,
        # rollback and a stop answer meanwhile; the journal is checked again after it.
        # _gating is cleared only once the outcome is journaled: a stop waits for that.
        # The old model's live latency is read before the gate starts: the gate child
        # competes for the same cores, and frames it slowed would make a lenient baseline.
        before_gate = self.host.live_latency() if self.host is not None else LiveLatency()
        try:
            outcome = self._shadow_before_activation(pkg, self._run_gate(pkg))
        except GateStopped as exc:
            with self._lock, self._gate_ended():
                self._end_gate(gating, pkg, f"{exc}; will retry")
            raise
        except EdgeAgentError as exc:
            with self._lock, self._gate_ended():
                self._still_gating(gating, pkg)
                self._refuse(f"gate could not run: {exc}", channel_key, pkg=pkg)
            raise GateFailedError(f"{pkg.name} {pkg.version}: gate could not run ({exc})") from None
        except BaseException:
            with self._lock, self._gate_ended():
                install.remove_tree(pkg.root)
            raise
        with self._lock, self._gate_ended():
            self._still_gating(gating, pkg)
            self._record_gate(pkg, outcome)
            kill_point("gate.done")
            if not outcome.passed:
                self._refuse(outcome.reason, channel_key, pkg=pkg)
                raise GateFailedError(f"{pkg.name} {pkg.version}: {outcome.reason}")
            return self._activate(pkg, outcome, channel_key, before_gate)

    @contextlib.contextmanager
    def _gate_ended(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._gating = None

    def _still_gating(self, gating: JournalEntry, pkg: ExtractedPackage) -> None:
        """OTAError (the candidate dropped) when the journal moved on during the gate: an
        operator rolled back, or recovery in another process closed the attempt."""
        last = self.journal.last()
        if last is not None and last.seq == gating.seq:
            return
        install.remove_tree(pkg.root)
        now = f"{last.state.value} ({last.reason})" if last is not None else "empty"
        raise OTAError(
            f"{pkg.name} {pkg.version}: dropped after the gate; the journal moved on to {now}"
        )

    def _end_gate(self, gating: JournalEntry, pkg: ExtractedPackage, reason: str) -> None:
        """A gate cut short by a stop: back to IDLE (at rest, so the next start counts no
        interrupted attempt), the extracted package removed; a later poll tries again."""
        install.remove_tree(pkg.root)
        last = self.journal.last()
        if last is not None and last.seq == gating.seq:
            self._enter(OTAState.IDLE, reason=reason)

    def _keyring_dir(self) -> Path:
        return self.state_dir / "keyring"

    def _check_manifest(self, manifest: Any, channel: ChannelDocument | None) -> None:
        """Compat and anti-downgrade on the verified manifest, before anything is extracted."""
        check_compat(manifest, __version__, self.config.ota.hardware_class, installed_runtimes())
        reverting = self._revert_allows(
            channel, manifest.name, manifest.version, manifest.release_counter
        )
        self._check_floor(manifest.name, manifest.version, manifest.release_counter, reverting)

    def _check_release(self, pkg: ExtractedPackage, channel: ChannelDocument | None) -> None:
        """The extracted package is what the channel named and still above the floor."""
        if channel is not None and (pkg.name, pkg.version) != (channel.package, channel.version):
            raise RepositoryError(
                f"channel {channel.channel} names {channel.package} {channel.version} but the "
                f"package is {pkg.name} {pkg.version}"
            )
        reverting = self._revert_allows(channel, pkg.name, pkg.version, pkg.release_counter)
        # Again after extraction: an injected reader may skip the hook, and the floor is
        # cheap to read.
        self._check_floor(pkg.name, pkg.version, pkg.release_counter, reverting)
        self._check_same_version(pkg)

    def _revert_allows(
        self, channel: ChannelDocument | None, name: str, version: str, counter: int
    ) -> bool:
        """Only a revert signed by the release threshold (attached to the channel document
        after verification) lets a package below the floor in; revert_versions never does."""
        if channel is None or channel.revert is None:
            return False
        return channel.revert.allows(name, version, counter, self.release_floor(name))

    def _check_same_version(self, pkg: ExtractedPackage) -> None:
        """PackageError when models/ already holds this name and version (as current or
        previous) with another manifest: activating it would run the old bytes and report
        them as the new install."""
        dir_name = install.package_dir_name(pkg.name, pkg.version)
        links = install.read_links(self.state_dir)
        if dir_name not in (links.current, links.previous):
            return
        on_disk = self.state_dir / install.MODELS / dir_name / "manifest.json"
        try:
            same = on_disk.read_bytes() == (pkg.root / "manifest.json").read_bytes()
        except OSError:
            return  # an unreadable installed copy is replaced by place_package's checks
        if not same:
            raise PackageError(
                f"{pkg.name} {pkg.version} is already installed with another manifest "
                "(same name and version, other bytes); publish the change as a new version"
            )

    def _refuse(
        self,
        reason: str,
        channel_key: str,
        pkg: ExtractedPackage | None = None,
        package: str | None = None,
        version: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if pkg is not None:
            kwargs = {"package": pkg.name, "version": pkg.version}
        elif package is not None:
            kwargs = {"package": package, "version": version or ""}
        entry = self._enter(OTAState.REJECTED, reason=reason, **kwargs)
        self.journal.record_refusal(entry.package, entry.version, channel_key, reason)
        kill_point("refuse.recorded")
        if pkg is not None:
            install.remove_tree(
                pkg.root.parent if pkg.root.parent != self.staging_dir else pkg.root
            )
        self._clean_staging_extracts()

    def _run_gate(self, pkg: ExtractedPackage) -> GateOutcome:
        """The gate's verdict on ``pkg``: in a child process with the policy's timeout and
        memory limit (agent/ota/gate_process.py), or the injected ``gate``."""
        baseline = install.resolve(self.state_dir, install.CURRENT)
        if baseline is None and self.config.model.path is not None:
            baseline = self.config.model.path
        if baseline is None:
            return GateOutcome(
                True,
                {"skipped": "no current model to compare"},
                "first install: no current model to compare",
            )
        if self.gate is not None:
            return self.gate(baseline, pkg.root, pkg.manifest)
        golden_dir = self.config.ota.golden_dir
        if golden_dir is None:
            raise StateError("OTA: no golden set configured (ota.golden_dir)")
        limits = GateLimits.from_policy(golden_dir, pkg.manifest.get("gate"))
        request = GateRequest(
            baseline=baseline,
            candidate=pkg.root,
            manifest=pkg.manifest,
            golden_dir=golden_dir,
            baseline_cache=self.state_dir / "gate-cache",
            model=self._model_config().model,
            memory_max_mb=limits.memory_max_mb,
        )
        return run_gate_child(request, self.staging_dir, limits.timeout_s, self.stopping)

    def _record_gate(self, pkg: ExtractedPackage, outcome: GateOutcome) -> None:
        """Keep the gate's report for status, and send it to telemetry."""
        self.journal.set_value(
            LAST_GATE_REPORT,
            json.dumps(
                {
                    "version": pkg.version,
                    "passed": outcome.passed,
                    "reason": outcome.reason,
                    "report": dict(outcome.report),
                },
                default=str,
            ),
        )
        if self.recorder is not None:
            try:
                self.recorder.event(
                    "ota.gate_report",
                    {
                        "version": pkg.version,
                        "passed": outcome.passed,
                        "report": dict(outcome.report),
                    },
                )
            except Exception as exc:  # telemetry must never stop an update
                log.warning("telemetry event failed: %s", exc)

    def _activate(
        self,
        pkg: ExtractedPackage,
        outcome: GateOutcome,
        channel_key: str,
        before_gate: LiveLatency,
    ) -> JournalEntry:
        dir_name = install.package_dir_name(pkg.name, pkg.version)
        links_before = install.read_links(self.state_dir)
        self._enter(
            OTAState.ACTIVATING,
            reason="loading and switching",
            detail={"links_before": links_before.to_dict(), "dir": dir_name},
        )
        # Load, warm and probe before any link moves: a model that cannot load, or whose
        # preprocessing cannot take a frame of the configured source, changes nothing.
        try:
            backend = self._load_backend(pkg.root, pkg.manifest)
            try:
                backend.warmup(max(1, self.config.model.warmup_runs))
            except BaseException:
                backend.close()
                raise
            live = self._live_model(backend, pkg.root, pkg.manifest)
        except EdgeAgentError as exc:
            self._enter(OTAState.ROLLED_BACK, reason=f"new model failed to load: {exc}")
            self.journal.record_refusal(pkg.name, pkg.version, channel_key, f"load failed: {exc}")
            install.remove_tree(pkg.root)
            raise ModelError(f"{pkg.name} {pkg.version}: failed to load ({exc})") from None
        kill_point("activate.loaded")
        final_dir = install.place_package(self.state_dir, pkg.root, dir_name)
        # the loaded session does not care, but status and logs should name where the
        # model file lives now, not the staging folder it was loaded from
        with contextlib.suppress(ValueError, AttributeError):
            backend.path = final_dir / pkg.model_path.relative_to(pkg.root)
        install.switch_to(self.state_dir, dir_name)
        kill_point("activate.switched")
        # the old model's latency in this same loop, under this same load: what probation
        # holds the new one to. Read before the gate when it had enough frames then (no
        # gate child competing for the cores); else just before the swap.
        assert self.probation_policy is not None
        window = self.probation_policy.latency_window_frames
        old_latency = before_gate
        if self.host is not None and before_gate.samples < window:
            old_latency = self.host.live_latency()
        if self.host is not None:
            self.host.swap_in(live)
        else:
            backend.close()
        baseline = Baseline.from_gate_report(outcome.report).with_live(old_latency, window)
        self._keep_gate_quality(pkg.name, pkg.version, outcome.report)
        self.arm_drift()
        baseline = self._with_live_confidence(baseline)
        entry = self._enter(
            OTAState.PROBATION,
            reason="watching the new model",
            detail={"restarts": 0, "probation_baseline": baseline.to_dict()},
        )
        self._start_watch(entry)
        self._start_probation_shadow(pkg.manifest)
        self._clean_staging_extracts()
        kill_point("activate.done")
        return entry

    # ------------------------------------------------------------------ drift and quality

    def _keep_gate_quality(self, name: str, version: str, report: Mapping[str, Any]) -> None:
        """Store what the gate measured that outlives the gate report (the next gate
        overwrites that): the golden-set histograms drift is measured against once this
        release is live, and the gate's smallest margin, keyed by release."""
        metrics = report.get("metrics")
        baseline = metrics.get("drift_baseline") if isinstance(metrics, Mapping) else None
        margin = report.get("margin")
        kept: dict[str, Any] = {}
        if isinstance(baseline, Mapping):
            kept["baseline"] = dict(baseline)
        if isinstance(margin, Mapping) and isinstance(margin.get("value"), (int, float)):
            kept["gate_margin"] = float(margin["value"])
            kept["gate_margin_check"] = str(margin.get("check", ""))
        if kept:
            self.journal.set_value(f"{GATE_QUALITY_PREFIX}{name}-{version}", json.dumps(kept))

    def gate_quality(self, name: str, version: str) -> dict[str, Any]:
        """What _keep_gate_quality stored for a release ({} when it was never gated here)."""
        raw = self.journal.get_value(f"{GATE_QUALITY_PREFIX}{name}-{version}")
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def arm_drift(self) -> None:
        """Tell telemetry the live model's golden-set baseline and the drift policy, so each
        summary carries its drift (agent/telemetry/drift.py); never raises."""
        arm = getattr(self.recorder, "set_drift_baseline", None)
        manifest = self.current_manifest()
        if arm is None or manifest is None:
            return
        from agent.telemetry.drift import DriftPolicy, GoldenBaseline, load_drift_policy

        name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
        stored = self.gate_quality(name, version).get("baseline")
        baseline = GoldenBaseline.from_dict(stored) if isinstance(stored, Mapping) else None
        policy = DriftPolicy()
        golden_dir = self.config.ota.golden_dir
        try:
            if golden_dir is not None:
                policy = load_drift_policy(golden_dir / "policy.yaml")
            arm(name, version, baseline, policy)
        except Exception as exc:  # drift is telemetry: it must never stop an update
            log.warning("drift: not armed for %s %s: %s", name, version, exc)

    def _quality_at_commit(self, name: str, version: str) -> dict[str, float]:
        """The COMMITTED row's ``quality`` figures this part knows: the gate's margin and
        the live model's drift from its golden baseline since it went live."""
        quality: dict[str, float] = {}
        margin = self.gate_quality(name, version).get("gate_margin")
        if isinstance(margin, (int, float)):
            quality["gate_margin"] = float(margin)
        since_live = getattr(self.recorder, "drift_since_live", None)
        if since_live is not None:
            try:
                figures = since_live(name, version)
            except Exception as exc:  # telemetry must never stop a commit
                log.warning("drift: not read at commit: %s", exc)
                figures = None
            if figures is not None:
                quality["drift_psi"] = round(float(figures.class_psi), 6)
        return quality

    # ------------------------------------------------------------------ probation

    def _start_watch(self, entry: JournalEntry) -> None:
        assert self.probation_policy is not None
        base = entry.detail.get("probation_baseline") or {}
        self._live_confidences.clear()
        self._watch = ProbationWatch(
            self.probation_policy,
            Baseline.from_gate_report({"probation_baseline": base}),
            started_s=self.monotonic_clock(),
        )

    def observe_frame(
        self,
        latency_s: float,
        confidence: float | None,
        error: bool = False,
        box_scores: Sequence[float] | None = None,
    ) -> Verdict:
        """Feed one frame of the live model (a detector's: with its boxes' scores); ends
        probation (commit or rollback) when due."""
        watch = self._watch
        if watch is None:
            if confidence is not None and not error:
                self._live_confidences.append(confidence)
            return Verdict.PASSED
        kill_point("probation.frame")
        if error or confidence is None:
            watch.observe_error()
        else:
            watch.observe(latency_s, confidence, box_scores)
        result = watch.judge(self.monotonic_clock())
        if self._shadow is not None:
            result = self._with_shadow_verdict(result)
        if result.verdict is not Verdict.PENDING:
            self._finish_probation(result)
        return result.verdict

    def probe_offline(self, inputs: Any) -> Verdict:
        """Probation without a daemon: run the live model on ``inputs`` (e.g. the golden set)
        frame by frame, judging errors, latency and confidence; commits or rolls back."""
        import numpy as np

        last = self.journal.last()
        if last is None or last.state is not OTAState.PROBATION:
            return Verdict.PASSED
        assert self.probation_policy is not None
        policy = self.probation_policy
        self.probation_policy = ProbationPolicy(
            **{**policy.__dict__, "min_s": 0.0, "min_frames": min(policy.min_frames, len(inputs))}
        )
        try:
            self._start_watch(last)
        finally:
            self.probation_policy = policy
        pkg_dir = install.resolve(self.state_dir, install.CURRENT)
        manifest = self.current_manifest()
        if pkg_dir is None or manifest is None:
            self.rollback("probation: current model missing", automatic=True)
            return Verdict.FAILED
        backend = self._load_backend(pkg_dir, manifest)
        # a detector (or segmenter) is judged on its decoded result, as the daemon does
        from agent.pipeline.detection import input_image_size, row_result
        from agent.pipeline.model import package_model_parts

        pre, labels = package_model_parts(pkg_dir, manifest)
        image_size = input_image_size(backend.inputs[0].shape, pre.layout)
        verdict = Verdict.PENDING
        for row in np.asarray(inputs, dtype=np.float32):
            started = time.perf_counter()
            try:
                outputs = backend.run(row[None])
            except EdgeAgentError:
                verdict = self.observe_frame(0.0, None, error=True)
            else:
                latency_s = time.perf_counter() - started
                if pre.task in ("detection", "segmentation"):
                    res = row_result(outputs, pre, labels, 0, image_size)
                    verdict = self.observe_frame(
                        latency_s, res.confidence, box_scores=res.box_scores
                    )
                else:
                    logits = np.asarray(outputs[0][0], dtype=np.float64)
                    p = np.exp(logits - logits.max())
                    verdict = self.observe_frame(latency_s, float(p.max() / p.sum()))
            if verdict is not Verdict.PENDING:
                break
        backend.close()
        return verdict

    def resume_probation(self) -> bool:
        """After recover(): re-arm the watch when the journal is in PROBATION."""
        last = self.journal.last()
        if last is None or last.state is not OTAState.PROBATION:
            return False
        self._start_watch(last)
        if self._shadow is None:
            self._start_probation_shadow(self.current_manifest() or {})
        return True

    def _finish_probation(self, result: ProbationResult) -> None:
        with self._lock:
            self._watch = None
            quality = self._probation_quality(result)
            self._stop_shadow()
            last = self.journal.last()
            if last is None or last.state is not OTAState.PROBATION:
                return
            if result.verdict is Verdict.PASSED:
                self.commit(result.reason, quality=quality)
                return
            refuse = True
            if result.latency_only:
                # latency may rest on a noisy machine: no permanent refusal until the same
                # release failed on latency alone latency_failures_max times
                key = f"latency_failures:{last.package}-{last.version}"
                failures = int(self.journal.get_value(key) or 0) + 1
                self.journal.set_value(key, str(failures))
                assert self.probation_policy is not None
                refuse = failures >= self.probation_policy.latency_failures_max
            self.rollback(
                f"probation failed: {result.reason}",
                automatic=True,
                record_refusal=refuse,
                quality=quality,
            )

    def commit(
        self, reason: str = "probation passed", quality: Mapping[str, float] | None = None
    ) -> JournalEntry:
        """Journal COMMITTED, then raise the floor and prune (recover() redoes both);
        ``quality``: probation's and the shadow's figures (docs/CONTRACTS.md)."""
        with self._lock:
            manifest = self.current_manifest()
            detail: dict[str, Any] = {}
            if manifest is not None:
                detail = {"release_counter": int(manifest.get("release_counter", 0))}
                gate_quality = self._quality_at_commit(
                    str(manifest.get("name", "")), str(manifest.get("version", ""))
                )
                if gate_quality:
                    detail["quality"] = gate_quality
            if quality:
                # probation's and the shadow's figures beside the gate's (drift, margin)
                detail["quality"] = {**detail.get("quality", {}), **dict(quality)}
            entry = self._enter(OTAState.COMMITTED, reason=reason, detail=detail)
            kill_point("commit.saved")
            self._finish_commit(entry)
            return entry

    def _finish_commit(self, entry: JournalEntry) -> None:
        """The work after a saved COMMITTED; idempotent, so a restart simply does it again."""
        counter = entry.detail.get("release_counter")
        if entry.package and isinstance(counter, int):
            with self._release_floor() as floor:
                floor.raise_to(entry.package, counter, entry.version)
            self.journal.delete_value(f"attempts:{entry.package}-{entry.version}")
            self.journal.delete_value(f"latency_failures:{entry.package}-{entry.version}")
        kill_point("commit.floor_raised")
        install.prune_models(self.state_dir)
        kill_point("commit.pruned")

    # ------------------------------------------------------------------ shadow evaluation

    def shadow_policy(self, manifest: Mapping[str, Any] | None = None) -> ShadowPolicy:
        """policy.yaml's ``shadow:`` section, tightened (only) by the package's ``shadow``."""
        from agent.ota.gate_policy import load_policy_section
        from agent.ota.shadow import shadow_policy_from_mapping, tighten

        golden = self.config.ota.golden_dir
        path = golden / "policy.yaml" if golden is not None else None
        data = load_policy_section(path, "shadow") if path is not None else None
        policy = shadow_policy_from_mapping(data, str(path or "policy.yaml"))
        policy, notes = tighten(policy, (manifest or {}).get("shadow"))
        for note in notes:
            log.warning("package shadow %s", note)
        return policy

    def _with_live_confidence(self, baseline: Baseline) -> Baseline:
        """The old model's mean confidence over its recent live frames, when enough ran."""
        assert self.probation_policy is not None
        seen = list(self._live_confidences)
        mean = sum(seen) / len(seen) if seen else None
        return baseline.with_live_confidence(
            mean, len(seen), self.probation_policy.confidence_min_samples
        )

    def _shadow_loader(
        self, package_dir: Path | None, manifest: Mapping[str, Any] | None
    ) -> Callable[[], ActiveModel]:
        """Loads (on the shadow worker's thread) a package's model, or the configured model
        file when ``package_dir`` is None, warmed like the live one."""

        def load() -> ActiveModel:
            from agent.pipeline.model import configured_model, package_model

            if package_dir is None or manifest is None:
                return configured_model(self._model_config())
            backend = self._load_backend(package_dir, manifest)
            try:
                backend.warmup(max(1, self.config.model.warmup_runs))
                return package_model(backend, package_dir, manifest)
            except BaseException:
                backend.close()
                raise

        return load

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

    def _start_probation_shadow(self, manifest: Mapping[str, Any]) -> None:
        """During probation the old model runs beside the new one on a sample of the
        live frames (only with a host whose frame loop feeds it)."""
        from agent.ota.shadow_run import ShadowRun

        policy = self.shadow_policy(manifest)
        if self.host is None or not policy.active:
            return
        prev_dir = install.resolve(self.state_dir, install.PREVIOUS)
        prev_manifest = self.current_manifest(install.PREVIOUS)
        if prev_dir is None and self.config.model.path is None:
            return  # a first install: no old model to compare with
        run = ShadowRun(policy, self._shadow_loader(prev_dir, prev_manifest), shadow_is_new=False)
        if not self._attach_shadow(run):
            run.close()

    def _with_shadow_verdict(self, result: ProbationResult) -> ProbationResult:
        """Probation's verdict with the shadow's: a failed shadow fails it at once; a
        passing probation waits for the shadow's frames (up to ``wait_max_s``, then
        commits on probation's own checks and says so)."""
        run = self._shadow
        failure = run.early_failure()
        if failure is not None:
            return dataclasses.replace(
                result, verdict=Verdict.FAILED, reason=failure, latency_only=False
            )
        if result.verdict is not Verdict.PASSED:
            return result
        gave_up = run.gave_up()
        if gave_up is not None:
            # the old model could not run beside the new one: not the new model's fault
            return dataclasses.replace(
                result, reason=f"{result.reason}; shadow not judged ({gave_up})"
            )
        if run.frames() < run.need_frames:
            if run.waited_s() < run.policy.wait_max_s:
                return dataclasses.replace(
                    result,
                    verdict=Verdict.PENDING,
                    reason=f"{result.reason}; waiting for the shadow "
                    f"({run.frames()}/{run.need_frames} frames)",
                )
            return dataclasses.replace(
                result,
                reason=f"{result.reason}; shadow not judged (only {run.frames()}/"
                f"{run.need_frames} frames in {run.policy.wait_max_s:g} s)",
            )
        shadow = run.judge()
        if shadow.verdict is ShadowVerdict.FAILED:
            return dataclasses.replace(
                result, verdict=Verdict.FAILED, reason=shadow.reason, latency_only=False
            )
        return dataclasses.replace(result, reason=f"{result.reason}; {shadow.reason}")

    def _probation_quality(self, result: ProbationResult) -> dict[str, float]:
        """The figures for the COMMITTED / ROLLED_BACK row (docs/CONTRACTS.md names)."""
        quality: dict[str, float] = {}
        if result.frames:
            quality["error_rate"] = result.errors / result.frames
        if result.latency_p95_ms is not None:
            quality["latency_p95_ms"] = result.latency_p95_ms
        if result.confidence_mean is not None:
            quality["confidence_mean"] = result.confidence_mean
        run = self._shadow
        if run is not None:
            quality.update(run.judge().quality)
        return quality

    def probation_status(self) -> dict[str, Any] | None:
        """Live figures for `edge-agent status` while a probation or shadow period runs."""
        watch, run = self._watch, self._shadow
        if watch is None and run is None:
            return None
        out: dict[str, Any] = {}
        if watch is not None:
            out["frames"] = watch.frames
            out["confidence_floor"] = watch.confidence_floor()
        if run is not None:
            out["shadow"] = run.status()
        return out

    def _shadow_before_activation(self, pkg: ExtractedPackage, outcome: GateOutcome) -> GateOutcome:
        """When policy asks (``shadow.before_activation_frames``): the candidate runs in
        shadow beside the serving model on that many live frames BEFORE any link moves; a
        failed check refuses it like the gate, with the figures in the reason.

        Runs without the lock, like the gate; a stop ends it (GateStopped, retried).
        """
        from agent.ota.shadow_run import ShadowRun

        if not outcome.passed or self.host is None:
            return outcome
        policy = self.shadow_policy(pkg.manifest)
        need = policy.before_activation_frames
        if need <= 0 or not policy.active:
            return outcome
        if (
            install.resolve(self.state_dir, install.CURRENT) is None
            and self.config.model.path is None
        ):
            return outcome  # a first install: nothing serves to compare with
        run = ShadowRun(
            policy,
            self._shadow_loader(pkg.root, pkg.manifest),
            shadow_is_new=True,
            need_frames=need,
        )
        if not self._attach_shadow(run):
            run.close()
            return outcome
        log.info(
            "OTA shadow: %s %s beside the live model for %d frames", pkg.name, pkg.version, need
        )
        try:
            while True:
                failure = run.early_failure()
                if failure is not None:
                    result = run.judge()
                    break
                if run.frames() >= need:
                    result = run.judge()
                    break
                if run.waited_s() > policy.wait_max_s:
                    raise GateStopped(
                        f"shadow period: only {run.frames()}/{need} frames in "
                        f"{policy.wait_max_s:g} s"
                    )
                if self.stopping.wait(0.05):
                    raise GateStopped("the agent is stopping during the shadow period")
                if self._shadow is not run:
                    # a rollback or a close ended it: the gate's caller sees the journal
                    raise GateStopped("the shadow period was ended by another operation")
        finally:
            self._stop_shadow()
        report = {**dict(outcome.report), "shadow": result.to_dict()}
        if result.verdict is ShadowVerdict.FAILED:
            return GateOutcome(False, report, f"before activation: {result.reason}")
        log.info("OTA shadow: %s", result.reason)
        return GateOutcome(True, report, outcome.reason)

    # ------------------------------------------------------------------ rollback

    def rollback(
        self,
        reason: str = "operator asked",
        automatic: bool = False,
        record_refusal: bool = True,
        quality: Mapping[str, float] | None = None,
    ) -> JournalEntry:
        """Switch back to ``previous`` (on disk and, with a host, live between two frames);
        an ``automatic`` rollback also refuses the release left, unless ``record_refusal``
        is False (a latency-only probation failure, which may be retried)."""
        with self._lock:
            self._watch = None
            self._stop_shadow()
            self._live_confidences.clear()
            prev_dir = install.resolve(self.state_dir, install.PREVIOUS)
            prev_manifest = self.current_manifest(install.PREVIOUS)
            if prev_dir is None or prev_manifest is None:
                raise StateError(f"{self.state_dir}: no previous model to roll back to")
            bad = self.journal.last()
            live: ActiveModel | None = None
            if self.host is not None:
                backend = self._load_backend(prev_dir, prev_manifest)
                try:
                    backend.warmup(max(1, self.config.model.warmup_runs))
                except BaseException:
                    backend.close()
                    raise
                # no probe: the previous model ran here before, and a rollback that
                # refused to happen would leave the failing model live
                live = self._live_model(backend, prev_dir, prev_manifest, probed=False)
            left = self.current_manifest() or {}
            kill_point("rollback.ready")
            install.swap_current_previous(self.state_dir)
            kill_point("rollback.switched")
            if live is not None and self.host is not None:
                self.host.swap_in(live)
            self.arm_drift()
            # Like every ROLLED_BACK row (and as the fleet reads them): ``version`` is the
            # release left behind, ``from_version`` the one the device runs again.
            entry = self._enter(
                OTAState.ROLLED_BACK,
                package=str(left.get("name", prev_manifest.get("name", ""))),
                version=str(left.get("version", "")),
                from_version=str(prev_manifest.get("version", "")),
                reason=reason,
                # the attempt's detail carries over as before, with the figures added
                detail={**(bad.detail if bad else {}), "quality": dict(quality)}
                if quality
                else None,
            )
            if automatic and record_refusal and bad is not None and bad.version:
                self._record_refusal(bad, reason)
            return entry

    def gating(self) -> str | None:
        """The package in the gate ("name version"), None when no gate runs."""
        return self._gating

    def mark_clean_stop(self) -> None:
        """On a clean stop: when a row is still in flight (a download or gate that did not
        come to rest in time), note its seq so the next start does not count the stop as
        an interrupted attempt; only crashes feed the breaker."""
        last = self.journal.last()
        if last is not None and RECOVERY[last.state] is Recovery.ABANDON:
            self.journal.set_value(CLEAN_STOP, str(last.seq))

    # ------------------------------------------------------------------ channel

    def channel_client(self) -> ChannelClient:
        url = self.config.ota.repository_url
        if not url:
            raise StateError("OTA: no repository_url in the ota section of the config")
        limits = FetchLimits(
            proxy_url=self.config.ota.proxy_url,
            min_bytes_per_s=self.config.ota.min_bytes_per_s,
            total_deadline_s=self.config.ota.download_deadline_s,
        )
        # the stop event cancels a download between two chunks when the agent stops
        http = HttpFetcher(limits, stop=self.stopping)
        clock = LastKnownGoodClock(self.journal, self.system_clock)
        return ChannelClient(self.state_dir, url, self.journal, http, clock)

    def check(self, client: ChannelClient | None = None, proceed: bool = False) -> CheckResult:
        """Look at the channel and decide whether to take its release.

        A check that takes nothing changes nothing: it is not journaled and sends no
        event; its time and outcome are kept in the ``last_check`` value (and in memory
        when even that cannot be written) for `edge-agent status`. With ``proceed`` and a
        release to take, the journal enters CHECKING for the caller's DOWNLOADING.
        """
        with self._lock:
            ota = self.config.ota
            last = self.journal.last()
            if last is not None and last.state is OTAState.PROBATION:
                # the journal allows no check while a new model is on probation; the poll
                # thread simply asks again after the commit or the rollback
                return CheckResult(
                    False, f"{last.package} {last.version} is on probation; checking after it"
                )
            if last is not None and last.state not in AT_REST:
                # another operation of this process (an install from the control socket)
                # is in flight; step() has already cleared rows that nobody owns
                return CheckResult(
                    False,
                    f"{last.state.value} {last.package} {last.version} in progress; "
                    "checking after it",
                )
            try:
                check_tuf_root(self.state_dir)
                client = client or self.channel_client()
                state = client.fetch_channel(ota.channel, want_revert=self._below_floor)
            except ChannelNotPublishedError as exc:
                # a fresh repository: nothing to follow yet, and nothing wrong
                self._note_check(ok=True, outcome=str(exc))
                return CheckResult(False, f"channel {ota.channel} is not published yet")
            except (RefusedError, FetchError, StateError) as exc:
                self._note_check(ok=False, outcome=f"check failed: {exc}")
                raise
            doc = self._with_revert(state.document, state.revert)
            decision = self._decide(doc)
            self._note_check(ok=True, outcome=decision.reason, version=doc.version)
            if decision.rollback:
                # the controller aborted a release this device runs: back to the local
                # previous model (journaled by rollback(); the check itself is not)
                if proceed:  # the poll and `update --now`; a plain check only reports it
                    self.rollback(decision.reason)
                return decision
            if decision.take:
                decision = dataclasses.replace(decision, package_ref=state.package)
            if decision.take and proceed:
                self._enter(
                    OTAState.CHECKING,
                    channel=ota.channel,
                    package=doc.package,
                    version=doc.version,
                    reason=decision.reason,
                )
            return decision

    def _below_floor(self, doc: ChannelDocument) -> bool:
        return doc.release_counter <= self.release_floor(doc.package)

    def _with_revert(self, doc: ChannelDocument, data: bytes | None) -> ChannelDocument:
        """The document with the release role's revert authorisation attached once its
        release-threshold signatures verify against this device's keyring."""
        if data is None:
            return doc
        from agent.package import Keyring
        from agent.package.revert import revert_target, verify_revert

        where = revert_target(doc.package, doc.version)
        try:
            auth = verify_revert(data, Keyring.load(self._keyring_dir()), where)
        except EdgeAgentError as exc:
            # without a verified revert the release is judged against the floor as usual
            log.warning("OTA: ignoring revert authorisation: %s", exc)
            return doc
        return dataclasses.replace(doc, revert=auth)

    def followed_package(self) -> str | None:
        """The one package name this device follows: the one it runs, else ``ota.package``."""
        manifest = self.current_manifest()
        if manifest is not None and manifest.get("name"):
            return str(manifest["name"])
        return self.config.ota.package

    def _note_check(self, *, ok: bool, outcome: str, version: str | None = None) -> None:
        """Keep the last check's time and outcome (a value row, not a journal row)."""
        self.last_check = {
            "ts": self.system_clock(),
            "ok": ok,
            "outcome": outcome,
            "channel": self.config.ota.channel,
            "version": version,
        }
        try:
            self.journal.set_value(LAST_CHECK, json.dumps(self.last_check, sort_keys=True))
        except StateError as exc:
            # a full disk must not turn every check into a failure; status shows the
            # in-memory copy through the daemon's status file until the write works again
            log.warning("OTA: cannot save the last check: %s", exc)

    def _decide(self, doc: ChannelDocument) -> CheckResult:
        ota = self.config.ota
        device = self.device_id()
        bucket = rollout_bucket(device, doc.salt)

        def no(reason: str) -> CheckResult:
            return CheckResult(False, reason, doc, bucket)

        followed = self.followed_package()
        if followed is not None and doc.package != followed:
            # the online rollout key must not move a device to a name whose floor is empty
            return no(
                f"channel {doc.channel} carries package {doc.package!r}; this device "
                f"follows {followed!r}"
            )
        current = self.current_version()
        if current and current in doc.revert_versions:
            previous = self.current_manifest(install.PREVIOUS)
            if previous is not None and previous.get("name") == doc.package:
                # the controller's abort: back to the locally kept, already verified previous
                # model (no download, the floor stays where it is)
                return CheckResult(
                    False,
                    f"channel reverts {doc.package} {current}: rolling back to "
                    f"{previous.get('version')}",
                    doc,
                    bucket,
                    rollback=True,
                )
        if doc.aborted:
            return no("rollout aborted")
        if doc.paused:
            return no("rollout paused")
        if ota.pin_version and doc.version != ota.pin_version:
            return no(f"pinned to {ota.pin_version}")
        if doc.version == current:
            return no("up to date")
        if not in_rollout(device, doc.salt, doc.percent):
            return no(f"not in rollout (bucket {bucket} >= {doc.percent * 100:.0f})")
        refused = self.journal.refusal(doc.package, doc.version, doc.fingerprint)
        if refused:
            return no(f"refused earlier: {refused}")
        floor = self.release_floor(doc.package)
        if doc.release_counter <= floor:
            if doc.revert is None:
                return no(
                    f"release_counter {doc.release_counter} is not above the floor {floor} "
                    "(going below it needs a revert signed by the release keys)"
                )
            try:
                doc.revert.check(doc.package, doc.version, doc.release_counter, floor)
            except DowngradeError as exc:
                return no(str(exc))
            return CheckResult(
                True, f"taking {doc.package} {doc.version} (signed revert)", doc, bucket
            )
        return CheckResult(True, f"taking {doc.package} {doc.version}", doc, bucket)

    def update_now(self, client: ChannelClient | None = None) -> CheckResult:
        """Check, and when the channel offers this device a release, download and install it."""
        client = client or self.channel_client()
        decision = self.check(client, proceed=True)
        if not decision.take or decision.document is None or decision.package_ref is None:
            return decision
        doc, ref = decision.document, decision.package_ref
        with self._lock:
            self._enter(
                OTAState.DOWNLOADING,
                package=doc.package,
                version=doc.version,
                from_version=self.current_version(),
                channel=doc.channel,
                reason=f"downloading {doc.target}",
                detail={"channel_key": doc.fingerprint},
            )
            try:
                path = download_target(
                    client.http,
                    ref,
                    self.staging_dir,
                    reserve_bytes=self.config.ota.reserve_free_bytes,
                )
            except (FetchError, OTAError) as exc:
                # The network is not the attacker's vote: a cut, a wrong hash or too many
                # bytes is a fetch failure, retried on the next poll (a cut resumes with
                # Range, a bad file is gone and starts from byte 0), never a refusal the
                # rollout controller would count.
                self._enter(OTAState.IDLE, reason=f"download failed, will retry: {exc}")
                raise
        self.install_file(path, channel=doc)
        path.unlink(missing_ok=True)
        return decision

    # ------------------------------------------------------------------ poll loop

    def poll_forever(self, stop: threading.Event, rng: random.Random | None = None) -> None:
        """Check the channel every poll interval (with jitter) until ``stop`` is set."""
        ota = self.config.ota
        while not stop.is_set():
            error = None
            at = time.time()
            try:
                with self.step():
                    self.update_now()
            except EdgeAgentError as exc:
                log.warning("OTA update: %s", exc)
                error = str(exc)
            except Exception as exc:  # the poll thread must outlive any one bad update
                log.exception("OTA update failed unexpectedly")
                error = f"unexpected {type(exc).__name__}: {exc}"
            delay_s = poll_delay_s(ota.poll_interval_s, ota.poll_jitter_s, rng)
            self._record_poll(at, delay_s, error)
            stop.wait(delay_s)

    def _record_poll(self, at: float, delay_s: float, error: str | None) -> None:
        # For `edge-agent status --watch` (last and next poll); a failed write must not
        # stop the poll loop.
        value = {"at": at, "next_at": time.time() + delay_s, "channel": self.config.ota.channel}
        try:
            self.journal.set_value(LAST_POLL, json.dumps({**value, "error": error}))
        except Exception as exc:
            log.warning("cannot record the OTA poll time: %s", exc)


def clear_staging(state_dir: Path) -> None:
    """Remove everything in staging/ (used by tests and `provision --reset`)."""
    shutil.rmtree(state_dir / "staging", ignore_errors=True)


class AttachedOTA:
    """The OTA service wired into a running daemon: control handlers plus the poll thread."""

    def __init__(self, service: OTAService, poll: bool) -> None:
        self.service = service
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll:
            self._thread = threading.Thread(
                target=service.poll_forever, args=(self._stop,), name="ota-poll", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        # a download or a gate in progress (poll thread or control socket) ends at rest
        self.service.stopping.set()
        self._stop.set()
        deadline = time.monotonic() + STOP_JOIN_S
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN_S)
        # an install from the control socket may be in the gate: let it come to rest
        while self.service.gating() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.service.mark_clean_stop()
        self.service.close()


def _reply(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return {"ok": True, **work()}
    except EdgeAgentError as exc:
        return {"ok": False, "error": str(exc), "exit_code": exc.exit_code}


def refuse_during_probation(service: OTAService) -> None:
    """StateError (exit 3) when a new model is on probation: one update at a time."""
    last = service.journal.last()
    if last is not None and last.state is OTAState.PROBATION:
        raise StateError(
            f"{last.package} {last.version} is on probation: install again once it is "
            f"committed or rolled back, or roll it back now (edge-agent rollback) "
            f"({service.state_dir})"
        )


def require_repository(config: AgentConfig) -> None:
    """ConfigError (exit 2) when the config names no repository to check."""
    if not config.ota.repository_url:
        raise ConfigError(
            "no ota.repository_url in the config: set it to the folder that holds "
            "metadata/ and targets/ (ota.repository_url)"
        )


# State dirs whose start-up recovery already ran in this process (see recover_at_start).
_RECOVERED_AT_START: set[Path] = set()


def recover_at_start(config: AgentConfig, recorder: Any = None) -> str:
    """Finish or undo the journal's in-flight update BEFORE the daemon loads any model.

    Call it first thing on start: a model that crashes the runtime process on load must
    still have each restart counted, or the crash-loop breaker never rolls it back.
    ``attach()`` later skips its own recovery for this state dir, so a restart is
    counted once.

    A state.db that SQLite cannot open or that fails quick_check is quarantined first and
    rebuilt from the links (see ``check_state_files``), so inference still starts.
    """
    check_state_files(config, recorder)
    service = OTAService(config, recorder=recorder)
    try:
        done = service.recover(agent_start=True)
    finally:
        service.close()
    _RECOVERED_AT_START.add(config.state_dir.resolve())
    log.info("OTA start-up: %s", done)
    return done


def check_state_files(config: AgentConfig, recorder: Any = None) -> StartCheck:
    """Quarantine a corrupt state.db (rebuilt from the links) or cached TUF metadata
    (fetched again), and report a corrupt trusted root or device id; never raises for a
    corrupt file, only when one cannot be moved aside."""

    def rebuild(item: Quarantined) -> str:
        service = OTAService(config, recorder=recorder)
        try:
            return service.rebuild_from_links(item)
        finally:
            service.close()

    event = getattr(recorder, "event", None)
    return check_state_dir(config.state_dir, rebuild, event)


def attach(daemon: Any) -> AttachedOTA:
    """Register ``install``, ``update`` and ``rollback`` on the daemon's control socket,
    recover the journal, re-arm probation, and start the poll loop when a repository is set.

    The daemon should call ``attached.service.observe_frame(latency_s, confidence, error)``
    once per frame so probation can end in a commit or a rollback.
    """
    if daemon.config.state_dir.resolve() not in _RECOVERED_AT_START:
        # before the service opens state.db: a corrupt one is moved aside and rebuilt
        check_state_files(daemon.config, getattr(daemon, "telemetry", None))
    service = OTAService(
        daemon.config,
        recorder=getattr(daemon, "telemetry", None),
        host=daemon,
    )
    if daemon.config.state_dir.resolve() not in _RECOVERED_AT_START:
        log.info("OTA start-up: %s", service.recover())
    service.resume_probation()
    service.arm_drift()

    def do_install(req: dict[str, Any]) -> dict[str, Any]:
        path = Path(str(req.get("path", "")))
        with service.step():
            refuse_during_probation(service)
            entry = service.install_file(path)
        return {
            "message": f"installed {entry.package} {entry.version}; on probation",
            **entry.to_dict(),
        }

    def do_update(check_only: bool) -> dict[str, Any]:
        require_repository(service.config)
        with service.step():
            result = service.check() if check_only else service.update_now()
        state = service.journal.state().value
        return {"message": f"{result.reason} (state {state})", "state": state, **result.to_dict()}

    def do_rollback(req: dict[str, Any]) -> dict[str, Any]:
        if install.resolve(service.state_dir, install.PREVIOUS) is None:
            raise StateError(
                f"{service.state_dir}: no previous model to roll back to (only the current "
                "one is installed; install another package to have one)"
            )
        with service.step():
            entry = service.rollback(str(req.get("reason", "operator asked")))
        return {
            "message": f"rolled back to {entry.package} {entry.from_version} "
            f"(from {entry.version})",
            **entry.to_dict(),
        }

    daemon.control.register("install", lambda req: _reply(lambda: do_install(req)))
    daemon.control.register("update", lambda req: _reply(lambda: do_update(False)))
    daemon.control.register("check", lambda req: _reply(lambda: do_update(True)))
    daemon.control.register("rollback", lambda req: _reply(lambda: do_rollback(req)))
    attached = AttachedOTA(service, poll=bool(daemon.config.ota.repository_url))
    return attached
