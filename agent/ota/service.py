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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.config import AgentConfig, PreprocessConfig
from agent.errors import (
    DowngradeError,
    EdgeAgentError,
    FetchError,
    GateFailedError,
    ModelError,
    OTAError,
    RefusedError,
    RepositoryError,
    StateError,
)
from agent.ota import install
from agent.ota.channel import ChannelClient, ChannelDocument, LastKnownGoodClock
from agent.ota.download import TargetRef, download_target
from agent.ota.fetch import FetchLimits, HttpFetcher
from agent.ota.journal import Journal, JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.membership import in_rollout, poll_delay_s, rollout_bucket
from agent.ota.probation import (
    Baseline,
    ProbationPolicy,
    ProbationResult,
    ProbationWatch,
    Verdict,
    crash_loop_tripped,
    probation_latency_p95_ms,
)
from agent.ota.states import AT_REST, RECOVERY, OTAState, Recovery
from agent.package import ReleaseFloor, check_compat
from agent.runtime import installed_runtimes
from agent.runtime.base import Backend
from agent.telemetry.identity import resolve_device_id

log = logging.getLogger(__name__)

LAST_GATE_REPORT = "last_gate_report"
LAST_POLL = "last_poll"
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


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    report: Mapping[str, Any]
    reason: str = ""


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


def run_gate_default(
    baseline: Path,
    candidate: Path,
    manifest: Mapping[str, Any],
    golden_dir: Path | None = None,
    baseline_cache: Path | None = None,
    load_model: Callable[[Path], Backend] | None = None,
) -> GateOutcome:
    """The golden-set gate (agent.ota.golden) on this device's golden set; with
    ``baseline_cache`` the current model's earlier run is reused instead of rerunning it.

    ``load_model`` (a package dir or model file -> loaded Backend) loads both models the
    way the daemon will run them (config.model's threads, providers, engine cache), so
    the gate times the candidate as it will run; the RSS its load and warm-up add still
    counts toward the memory check.
    """
    from agent.ota import golden

    if golden_dir is None:
        raise StateError("OTA: no golden set configured (ota.golden_dir)")
    if load_model is None:
        report = golden.run_gate(
            baseline,
            candidate,
            golden_dir,
            package_gate=manifest.get("gate"),
            baseline_cache=baseline_cache,
        )
    else:
        report = _run_gate_loaded(
            baseline, candidate, manifest, golden_dir, baseline_cache, load_model
        )
    data = report.to_dict()
    failed = [str(c) for c in data.get("failed", [])] if isinstance(data, dict) else []
    reason = "gate passed" if report.passed else f"gate failed: {', '.join(failed) or 'see report'}"
    return GateOutcome(passed=bool(report.passed), report=data, reason=reason)


def _run_gate_loaded(
    baseline: Path,
    candidate: Path,
    manifest: Mapping[str, Any],
    golden_dir: Path,
    baseline_cache: Path | None,
    load_model: Callable[[Path], Backend],
) -> Any:
    """run_gate on backends loaded by ``load_model``; returns the GateReport."""
    from agent.ota import golden

    rss_before = golden.current_rss_bytes()
    cand_backend = load_model(candidate)
    try:
        # run_gate warms what it loads itself; here the warm-up's RSS must count too
        cand_backend.warmup(golden.WARMUP_RUNS)
        load_rss_bytes = max(0, golden.current_rss_bytes() - rss_before)
        base_backend = load_model(baseline)
        try:
            report = golden.run_gate(
                base_backend,
                cand_backend,
                golden_dir,
                package_gate=manifest.get("gate"),
                baseline_cache=baseline_cache,
            )
        finally:
            base_backend.close()
    finally:
        cand_backend.close()
    return _with_load_rss(report, load_rss_bytes, baseline, candidate, manifest)


def _with_load_rss(
    report: Any,
    load_rss_bytes: int,
    baseline: Path,
    candidate: Path,
    manifest: Mapping[str, Any],
) -> Any:
    """The report with the candidate's load RSS added to its memory check (run_gate only
    sees what a backend handed to it adds while it runs), and the models' package labels."""
    import dataclasses

    from agent.ota import golden

    added_mb = load_rss_bytes / golden.MB
    checks = []
    for check in report.checks:
        if check.name == "memory" and check.value is not None:
            value = float(check.value) + added_mb
            verdict = check.verdict
            if check.threshold is not None and verdict != "skip":
                verdict = "pass" if value <= float(check.threshold) else "fail"
            check = dataclasses.replace(
                check,
                value=value,
                verdict=verdict,
                detail=f"candidate added {value:.1f} MB RSS",
            )
        checks.append(check)
    report.checks = checks
    report.passed = not any(c.failed for c in checks)
    memory = report.metrics.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("candidate_rss_added_mb"), float):
        memory["candidate_rss_added_mb"] += added_mb
    for role, source, package in (
        ("baseline", baseline, None),
        ("candidate", candidate, manifest),
    ):
        entry = report.models.get(role)
        if isinstance(entry, dict) and source.is_dir():
            data = package if package is not None else _manifest_or_none(source)
            if data is not None:
                entry["label"] = f"{data.get('name', '?')}-{data.get('version', '?')}"
    return report


def _manifest_or_none(package_dir: Path) -> Mapping[str, Any] | None:
    try:
        data = json.loads((package_dir / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_package_backend(
    package_dir: Path, manifest: Mapping[str, Any], config: AgentConfig | None = None
) -> Backend:
    """Load the model of an installed/extracted package with the runtime its manifest names
    and ``config.model``'s backend options (the daemon's own loader; defaults without one)."""
    from agent.daemon import load_package_backend as load_with_config

    return load_with_config(config or AgentConfig(), package_dir, manifest)


def preprocess_from_manifest(manifest: Mapping[str, Any]) -> PreprocessConfig:
    pre = manifest.get("preprocess") or {}
    known = {"resize", "layout", "color_order", "mean", "std", "scale"}
    values: dict[str, Any] = {}
    for key, value in pre.items():
        if key in known:
            values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return PreprocessConfig(**values)
    except TypeError:
        return PreprocessConfig()


@dataclass(frozen=True)
class CheckResult:
    """What a channel check decided."""

    take: bool
    reason: str
    document: ChannelDocument | None = None
    bucket: int | None = None
    package_ref: TargetRef | None = None

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

    ``slot`` (a ModelSlot) is set when a daemon runs: activation then loads and warms the
    new model beside the live one and swaps it between two frames. ``daemon`` (set by
    ``attach``) makes the swap go through ``daemon.swap_model``, so the daemon reads the
    package's schema its own way and closes the old backend at the next frame boundary.
    """

    config: AgentConfig
    recorder: Any = None
    slot: Any = None
    daemon: Any = None
    read_package: PackageReader = read_package_default
    gate: GateRunner | None = None
    # None: the daemon's loader with config.model's backend options (load_with_config);
    # tests and tools may inject their own
    load_model: BackendLoader | None = None
    system_clock: Callable[[], float] = time.time
    probation_policy: ProbationPolicy | None = None
    _watch: ProbationWatch | None = field(default=None, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)

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
        self.journal.close()

    # ------------------------------------------------------------------ model loads

    def _model_config(self) -> AgentConfig:
        # the running daemon's config, so a reload's new threads/providers apply to the
        # next install or rollback too
        daemon_config = getattr(self.daemon, "config", None)
        return daemon_config if isinstance(daemon_config, AgentConfig) else self.config

    def load_with_config(self, package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
        """The default ``load_model``: the daemon's loader with config.model's options."""
        return load_package_backend(package_dir, manifest, self._model_config())

    def _load_backend(self, package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
        """Every OTA model load (activation, rollback, probation, the gate's models)."""
        assert self.load_model is not None  # set in __post_init__
        return self.load_model(package_dir, manifest)

    def _load_for_gate(self, source: Path) -> Backend:
        """A package dir or the configured model file, loaded as the daemon would run it."""
        config = self._model_config()
        if source.is_dir():
            manifest = _manifest_or_none(source)
            if manifest is None:
                raise ModelError(f"{source}: cannot read the package's manifest.json")
            return self._load_backend(source, manifest)
        from agent.daemon import load_model_file

        return load_model_file(config, source, config.model.backend)

    # ------------------------------------------------------------------ events

    def _emit(self, entry: JournalEntry) -> None:
        attrs = {
            "state": entry.state.value,
            "package": entry.package,
            "version": entry.version,
            "from_version": entry.from_version,
            "reason": entry.reason,
            "channel": entry.channel,
        }
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
            if last is None or last.state in AT_REST:
                return "nothing in flight"
            action = RECOVERY[last.state]
            key = f"attempts:{last.package}-{last.version}"
            if action is Recovery.CONTINUE_PROBATION:
                if not agent_start:
                    return "probation in progress"
                restarts = int(last.detail.get("restarts", 0)) + 1
                if crash_loop_tripped(restarts, self.config.ota.crash_loop_limit):
                    self.rollback(
                        f"crash loop: {restarts} restarts during probation", automatic=True
                    )
                    return "rolled back (crash loop)"
                self._enter(
                    OTAState.PROBATION,
                    reason=f"restart {restarts} during probation",
                    detail={"restarts": restarts},
                )
                return "probation continues"
            attempts = int(self.journal.get_value(key) or 0) + 1
            self.journal.set_value(key, str(attempts))
            if action is Recovery.UNDO_ACTIVATION:
                before = last.detail.get("links_before") or {}
                install.restore_links(
                    self.state_dir,
                    install.Links(before.get("current"), before.get("previous")),
                )
                reason = f"interrupted during activation (attempt {attempts}); links restored"
                self._enter(OTAState.ROLLED_BACK, reason=reason)
                if attempts >= self.config.ota.crash_loop_limit:
                    self._record_refusal(last, f"activation interrupted {attempts} times")
                return "activation undone"
            if attempts >= self.config.ota.crash_loop_limit and last.version:
                reason = f"interrupted {attempts} times in {last.state.value}; refused"
                self._enter(OTAState.REJECTED, reason=reason)
                self._record_refusal(last, reason)
                return "refused after repeated interruptions"
            self._enter(
                OTAState.IDLE,
                reason=f"interrupted in {last.state.value} (attempt {attempts}); will retry",
            )
            return "abandoned"

    def _record_refusal(self, entry: JournalEntry, reason: str) -> None:
        channel_key = str(entry.detail.get("channel_key", "local"))
        self.journal.record_refusal(entry.package, entry.version, channel_key, reason)

    def _clean_staging_extracts(self) -> None:
        if not self.staging_dir.is_dir():
            return
        for entry in self.staging_dir.iterdir():
            if entry.name.startswith(STAGING_EXTRACT_PREFIX):
                install.remove_tree(entry)

    # ------------------------------------------------------------------ install

    def install_file(self, tar_path: Path, channel: ChannelDocument | None = None) -> JournalEntry:
        """Verify -> compat -> gate -> activate one package file; ends in PROBATION.

        A refusal is journaled (REJECTED, with the reason), recorded so the same version
        is not retried until the channel changes, and re-raised for the caller.
        """
        with self._lock:
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
            self._enter(
                OTAState.GATING,
                package=pkg.name,
                version=pkg.version,
                reason="running the golden-set gate",
            )
            try:
                outcome = self._run_gate(pkg)
            except EdgeAgentError as exc:
                self._refuse(f"gate could not run: {exc}", channel_key, pkg=pkg)
                raise GateFailedError(
                    f"{pkg.name} {pkg.version}: gate could not run ({exc})"
                ) from None
            kill_point("gate.done")
            if not outcome.passed:
                self._refuse(outcome.reason, channel_key, pkg=pkg)
                raise GateFailedError(f"{pkg.name} {pkg.version}: {outcome.reason}")
            return self._activate(pkg, outcome, channel_key)

    def _keyring_dir(self) -> Path:
        return self.state_dir / "keyring"

    def _check_manifest(self, manifest: Any, channel: ChannelDocument | None) -> None:
        """Compat and anti-downgrade on the verified manifest, before anything is extracted."""
        check_compat(manifest, __version__, self.config.ota.hardware_class, installed_runtimes())
        reverting = channel is not None and manifest.version in channel.revert_versions
        self._check_floor(manifest.name, manifest.version, manifest.release_counter, reverting)

    def _check_release(self, pkg: ExtractedPackage, channel: ChannelDocument | None) -> None:
        """The extracted package is what the channel named and still above the floor."""
        if channel is not None and (pkg.name, pkg.version) != (channel.package, channel.version):
            raise RepositoryError(
                f"channel {channel.channel} names {channel.package} {channel.version} but the "
                f"package is {pkg.name} {pkg.version}"
            )
        reverting = channel is not None and pkg.version in channel.revert_versions
        # Again after extraction: an injected reader may skip the hook, and the floor is
        # cheap to read.
        self._check_floor(pkg.name, pkg.version, pkg.release_counter, reverting)

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
        baseline = install.resolve(self.state_dir, install.CURRENT)
        if baseline is None and self.config.model.path is not None:
            baseline = self.config.model.path
        if baseline is None:
            outcome = GateOutcome(
                True,
                {"skipped": "no current model to compare"},
                "first install: no current model to compare",
            )
        elif self.gate is not None:
            outcome = self.gate(baseline, pkg.root, pkg.manifest)
        else:
            outcome = run_gate_default(
                baseline,
                pkg.root,
                pkg.manifest,
                self.config.ota.golden_dir,
                baseline_cache=self.state_dir / "gate-cache",
                load_model=self._load_for_gate,
            )
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
        return outcome

    def _activate(
        self, pkg: ExtractedPackage, outcome: GateOutcome, channel_key: str
    ) -> JournalEntry:
        dir_name = install.package_dir_name(pkg.name, pkg.version)
        links_before = install.read_links(self.state_dir)
        self._enter(
            OTAState.ACTIVATING,
            reason="loading and switching",
            detail={"links_before": links_before.to_dict(), "dir": dir_name},
        )
        # Load and warm before any link moves: a model that cannot load changes nothing.
        live: Any = None
        try:
            backend = self._load_backend(pkg.root, pkg.manifest)
            try:
                backend.warmup(max(1, self.config.model.warmup_runs))
                if self.daemon is not None:
                    # the daemon's own reading of the schema, so a manifest it cannot run
                    # is refused here, before any link moves
                    live = self.daemon.package_model(backend, pkg.root, pkg.manifest)
            except EdgeAgentError:
                backend.close()
                raise
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
        live_p95_ms = self._live_latency_p95_ms()
        if live is not None:
            self.daemon.swap_model(live)
        elif self.slot is not None:
            self._hot_swap(backend, final_dir, pkg.manifest)
        else:
            backend.close()
        baseline = Baseline.from_gate_report(outcome.report)
        baseline = dataclasses.replace(
            baseline,
            latency_p95_ms=probation_latency_p95_ms(baseline.latency_p95_ms, live_p95_ms),
        )
        entry = self._enter(
            OTAState.PROBATION,
            reason="watching the new model",
            detail={
                "restarts": 0,
                "probation_baseline": {
                    "latency_p95_ms": baseline.latency_p95_ms,
                    "confidence_mean": baseline.confidence_mean,
                },
            },
        )
        self._start_watch(entry)
        self._clean_staging_extracts()
        kill_point("activate.done")
        return entry

    def _live_latency_p95_ms(self) -> float | None:
        """The running model's p95 in the daemon's own loop (None without a daemon)."""
        stats = getattr(self.daemon, "stats", None)
        if stats is None:
            return None
        p95 = stats.latency_ms().get("p95")
        return float(p95) if p95 is not None else None

    def _hot_swap(self, backend: Backend, package_dir: Path, manifest: Mapping[str, Any]) -> None:
        from agent.pipeline.slot import ActiveModel

        daemon = self.daemon
        if daemon is not None:
            # the daemon builds the model's preprocessing (task, top_k, labels file) as it
            # does at start, swaps between two frames and closes the old backend there
            try:
                live = daemon.package_model(backend, package_dir, manifest)
            except EdgeAgentError:
                backend.close()
                raise
            daemon.swap_model(live)
            return
        model = ActiveModel(
            backend=backend,
            name=str(manifest.get("name", package_dir.name)),
            version=str(manifest.get("version", "")),
            preprocess=preprocess_from_manifest(manifest),
            labels=tuple(str(x) for x in manifest.get("labels", [])),
            manifest=manifest,
        )
        old = self.slot.swap(model)
        if old is not None and old.backend is not backend:
            # The frame that read the old model may still be running on it; the backend
            # is closed lazily by GC, not here.
            pass

    # ------------------------------------------------------------------ probation

    def _start_watch(self, entry: JournalEntry) -> None:
        assert self.probation_policy is not None
        base = entry.detail.get("probation_baseline") or {}
        self._watch = ProbationWatch(
            self.probation_policy,
            Baseline.from_gate_report({"probation_baseline": base}),
            started_s=self.system_clock(),
        )

    def observe_frame(
        self, latency_s: float, confidence: float | None, error: bool = False
    ) -> Verdict:
        """Feed one frame of the live model; ends probation (commit or rollback) when due."""
        watch = self._watch
        if watch is None:
            return Verdict.PASSED
        kill_point("probation.frame")
        if error or confidence is None:
            watch.observe_error()
        else:
            watch.observe(latency_s, confidence)
        result = watch.judge(self.system_clock())
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
        verdict = Verdict.PENDING
        for row in np.asarray(inputs, dtype=np.float32):
            started = time.perf_counter()
            try:
                logits = np.asarray(backend.run(row[None])[0][0], dtype=np.float64)
            except EdgeAgentError:
                verdict = self.observe_frame(0.0, None, error=True)
            else:
                p = np.exp(logits - logits.max())
                verdict = self.observe_frame(
                    time.perf_counter() - started, float(p.max() / p.sum())
                )
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
        return True

    def _finish_probation(self, result: ProbationResult) -> None:
        with self._lock:
            self._watch = None
            last = self.journal.last()
            if last is None or last.state is not OTAState.PROBATION:
                return
            if result.verdict is Verdict.PASSED:
                self.commit(result.reason)
            else:
                self.rollback(f"probation failed: {result.reason}", automatic=True)

    def commit(self, reason: str = "probation passed") -> JournalEntry:
        """Journal COMMITTED, then raise the floor and prune (recover() redoes both)."""
        with self._lock:
            manifest = self.current_manifest()
            detail: dict[str, Any] = {}
            if manifest is not None:
                detail = {"release_counter": int(manifest.get("release_counter", 0))}
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
        kill_point("commit.floor_raised")
        install.prune_models(self.state_dir)
        kill_point("commit.pruned")

    # ------------------------------------------------------------------ rollback

    def rollback(self, reason: str = "operator asked", automatic: bool = False) -> JournalEntry:
        """Switch back to ``previous`` (on disk and, with a daemon, in the live slot)."""
        with self._lock:
            self._watch = None
            prev_dir = install.resolve(self.state_dir, install.PREVIOUS)
            prev_manifest = self.current_manifest(install.PREVIOUS)
            if prev_dir is None or prev_manifest is None:
                raise StateError(f"{self.state_dir}: no previous model to roll back to")
            bad = self.journal.last()
            backend = None
            if self.slot is not None or self.daemon is not None:
                backend = self._load_backend(prev_dir, prev_manifest)
                backend.warmup(max(1, self.config.model.warmup_runs))
            left = self.current_manifest() or {}
            kill_point("rollback.ready")
            install.swap_current_previous(self.state_dir)
            kill_point("rollback.switched")
            if backend is not None:
                self._hot_swap(backend, prev_dir, prev_manifest)
            # Like every ROLLED_BACK row (and as the fleet reads them): ``version`` is the
            # release left behind, ``from_version`` the one the device runs again.
            entry = self._enter(
                OTAState.ROLLED_BACK,
                package=str(left.get("name", prev_manifest.get("name", ""))),
                version=str(left.get("version", "")),
                from_version=str(prev_manifest.get("version", "")),
                reason=reason,
            )
            if automatic and bad is not None and bad.version:
                self._record_refusal(bad, reason)
            return entry

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
        http = HttpFetcher(limits)
        clock = LastKnownGoodClock(self.journal, self.system_clock)
        return ChannelClient(self.state_dir, url, self.journal, http, clock)

    def check(self, client: ChannelClient | None = None, proceed: bool = False) -> CheckResult:
        """Look at the channel and decide whether to take its release (journals CHECKING).

        With ``proceed`` the journal stays in CHECKING for the caller's DOWNLOADING;
        otherwise it returns to IDLE, with the decision as the reason.
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
            self._enter(
                OTAState.CHECKING,
                channel=ota.channel,
                package="",
                version="",
                reason="checking the channel",
            )
            client = client or self.channel_client()
            try:
                state = client.fetch_channel(ota.channel)
            except (RefusedError, FetchError, StateError) as exc:
                self._enter(OTAState.IDLE, reason=f"check failed: {exc}")
                raise
            doc = state.document
            decision = self._decide(doc)
            if decision.take:
                decision = CheckResult(True, decision.reason, doc, decision.bucket, state.package)
            if not decision.take or not proceed:
                self._enter(
                    OTAState.IDLE, reason=decision.reason, package=doc.package, version=doc.version
                )
            return decision

    def _decide(self, doc: ChannelDocument) -> CheckResult:
        ota = self.config.ota
        device = self.device_id()
        bucket = rollout_bucket(device, doc.salt)

        def no(reason: str) -> CheckResult:
            return CheckResult(False, reason, doc, bucket)

        if doc.aborted:
            return no("rollout aborted")
        if doc.paused:
            return no("rollout paused")
        if ota.pin_version and doc.version != ota.pin_version:
            return no(f"pinned to {ota.pin_version}")
        if doc.version == self.current_version():
            return no("up to date")
        if not in_rollout(device, doc.salt, doc.percent):
            return no(f"not in rollout (bucket {bucket} >= {doc.percent * 100:.0f})")
        refused = self.journal.refusal(doc.package, doc.version, doc.fingerprint)
        if refused:
            return no(f"refused earlier: {refused}")
        floor = self.release_floor(doc.package)
        if doc.release_counter <= floor and doc.version not in doc.revert_versions:
            return no(f"release_counter {doc.release_counter} is not above the floor {floor}")
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
            except RefusedError as exc:
                self._refuse(str(exc), doc.fingerprint)
                raise
            except (FetchError, OTAError) as exc:
                # Network trouble: the partial file stays in staging for a Range resume.
                self._enter(OTAState.IDLE, reason=f"download failed: {exc}")
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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.service.close()


def _reply(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return {"ok": True, **work()}
    except EdgeAgentError as exc:
        return {"ok": False, "error": str(exc), "exit_code": exc.exit_code}


# State dirs whose start-up recovery already ran in this process (see recover_at_start).
_RECOVERED_AT_START: set[Path] = set()


def recover_at_start(config: AgentConfig, recorder: Any = None) -> str:
    """Finish or undo the journal's in-flight update BEFORE the daemon loads any model.

    Call it first thing on start: a model that crashes the runtime process on load must
    still have each restart counted, or the crash-loop breaker never rolls it back.
    ``attach()`` later skips its own recovery for this state dir, so a restart is
    counted once.
    """
    service = OTAService(config, recorder=recorder)
    try:
        done = service.recover(agent_start=True)
    finally:
        service.close()
    _RECOVERED_AT_START.add(config.state_dir.resolve())
    log.info("OTA start-up: %s", done)
    return done


def attach(daemon: Any) -> AttachedOTA:
    """Register ``install``, ``update`` and ``rollback`` on the daemon's control socket,
    recover the journal, re-arm probation, and start the poll loop when a repository is set.

    The daemon should call ``attached.service.observe_frame(latency_s, confidence, error)``
    once per frame so probation can end in a commit or a rollback.
    """
    service = OTAService(
        daemon.config,
        recorder=getattr(daemon, "telemetry", None),
        slot=daemon.slot,
        daemon=daemon if hasattr(daemon, "package_model") else None,
    )
    if daemon.config.state_dir.resolve() not in _RECOVERED_AT_START:
        log.info("OTA start-up: %s", service.recover())
    service.resume_probation()

    def do_install(req: dict[str, Any]) -> dict[str, Any]:
        path = Path(str(req.get("path", "")))
        entry = service.install_file(path)
        return {
            "message": f"installed {entry.package} {entry.version}; on probation",
            **entry.to_dict(),
        }

    def do_update(_req: dict[str, Any]) -> dict[str, Any]:
        result = service.update_now()
        return {"message": result.reason, **result.to_dict()}

    def do_rollback(req: dict[str, Any]) -> dict[str, Any]:
        entry = service.rollback(str(req.get("reason", "operator asked")))
        return {
            "message": f"rolled back to {entry.package} {entry.from_version} "
            f"(from {entry.version})",
            **entry.to_dict(),
        }

    daemon.control.register("install", lambda req: _reply(lambda: do_install(req)))
    daemon.control.register("update", lambda req: _reply(lambda: do_update(req)))
    daemon.control.register("rollback", lambda req: _reply(lambda: do_rollback(req)))
    attached = AttachedOTA(service, poll=bool(daemon.config.ota.repository_url))
    return attached
