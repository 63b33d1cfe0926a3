"""The install flow: verify a package file, gate it, activate it into probation."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import (
    EdgeAgentError,
    GateFailedError,
    ModelError,
    OTAError,
    PackageError,
    RefusedError,
    RepositoryError,
    StateError,
)
from agent.ota import install
from agent.ota.channel import ChannelDocument
from agent.ota.context import STAGING_EXTRACT_PREFIX
from agent.ota.gate_process import GateLimits, GateOutcome, GateRequest, GateStopped, run_gate_child
from agent.ota.host import LiveLatency
from agent.ota.journal import LAST_GATE_REPORT, JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.package_reader import ExtractedPackage
from agent.ota.probation import Baseline
from agent.ota.probation_flow import ProbationFlow
from agent.ota.shadow import ShadowVerdict
from agent.ota.states import OTAEvent, OTAState
from agent.package import check_compat
from agent.runtime import installed_runtimes

log = logging.getLogger(__name__)


class InstallFlow(ProbationFlow):
    """Verify -> gate -> activate one package file, journaling each step."""

    def install_file(self, tar_path: Path, channel: ChannelDocument | None = None) -> JournalEntry:
        """Verify -> compat -> gate -> activate one package file; ends in PROBATION.

        A refusal is journaled (REJECTED, with the reason), recorded so the same version
        is not retried until the channel changes, and re-raised for the caller.
        """
        channel_key = channel.fingerprint if channel else "local"
        with self._lock:
            if self._gating is not None:
                raise StateError(
                    f"OTA: {self._gating} is in the gate; install again after it finishes"
                )
            pkg = self._verify(tar_path, channel, channel_key)
            gating = self._enter_gate(pkg)
        # The gate runs without the lock (in a child process by default), so status,
        # rollback and a stop answer meanwhile; the journal is checked again after it.
        # _gating is cleared only once the outcome is journaled: a stop waits for that.
        # The old model's live latency is read before the gate starts: the gate child
        # competes for the same cores, and frames it slowed would make a lenient baseline.
        before_gate = self.host.live_latency() if self.host is not None else LiveLatency()
        outcome = self._gate(pkg, gating, channel_key)
        with self._lock, self._gate_ended():
            self._still_gating(gating, pkg)
            self._record_gate(pkg, outcome)
            kill_point("gate.done")
            if not outcome.passed:
                self._refuse(OTAEvent.GATE_FAILED, outcome.reason, channel_key, pkg=pkg)
                raise GateFailedError(f"{pkg.name} {pkg.version}: {outcome.reason}")
            return self._activate(pkg, outcome, channel_key, before_gate)

    def _verify(
        self, tar_path: Path, channel: ChannelDocument | None, channel_key: str
    ) -> ExtractedPackage:
        """VERIFYING: signatures, files, compat and floor, extracted into staging/; a refusal
        ends in REJECTED, an error that is not the package's fault (disk, I/O) in IDLE."""
        # a file this flow downloaded, or one at hand (a local install)
        downloaded = self.journal.state() is OTAState.DOWNLOADING
        self.fire(
            OTAEvent.DOWNLOADED if downloaded else OTAEvent.INSTALL_STARTED,
            package=channel.package if channel else "",
            version=channel.version if channel else "",
            from_version=self.current_version(),
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
                OTAEvent.VERIFY_FAILED,
                str(exc),
                channel_key,
                package=seen.get("package"),
                version=seen.get("version"),
            )
            raise
        except OSError as exc:
            install.remove_tree(extract_dir)
            reason = f"cannot extract {tar_path.name}: {exc.strerror or exc}"
            self.fire(OTAEvent.VERIFY_ERROR, reason=reason)
            raise OTAError(f"{tar_path}: {reason}") from None
        except EdgeAgentError as exc:
            install.remove_tree(extract_dir)
            self.fire(OTAEvent.VERIFY_ERROR, reason=str(exc))
            raise
        return pkg

    def _enter_gate(self, pkg: ExtractedPackage) -> JournalEntry:
        """GATING: the row the gate's outcome is checked against once it ends."""
        # marked before the row is saved, so a stop that sees GATING also waits for it
        self._gating = f"{pkg.name} {pkg.version}"
        try:
            return self.fire(
                OTAEvent.VERIFIED,
                package=pkg.name,
                version=pkg.version,
                reason="running the golden-set gate",
            )
        except BaseException:
            self._gating = None
            raise

    def _gate(self, pkg: ExtractedPackage, gating: JournalEntry, channel_key: str) -> GateOutcome:
        """The gate's (and the shadow period's) outcome, run without the lock; a stop ends
        in IDLE (retried), a gate that could not run refuses the package."""
        try:
            return self._shadow_before_activation(pkg, self._run_gate(pkg))
        except GateStopped as exc:
            with self._lock, self._gate_ended():
                self._end_gate(gating, pkg, f"{exc}; will retry")
            raise
        except EdgeAgentError as exc:
            with self._lock, self._gate_ended():
                self._still_gating(gating, pkg)
                self._refuse(
                    OTAEvent.GATE_FAILED, f"gate could not run: {exc}", channel_key, pkg=pkg
                )
            raise GateFailedError(f"{pkg.name} {pkg.version}: gate could not run ({exc})") from None
        except BaseException:
            with self._lock, self._gate_ended():
                install.remove_tree(pkg.root)
            raise

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
            self.fire(OTAEvent.GATE_STOPPED, reason=reason)

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
        event: OTAEvent,
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
        entry = self.fire(event, reason=reason, **kwargs)
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
        self.fire(
            OTAEvent.GATE_PASSED,
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
            self.fire(OTAEvent.LOAD_FAILED, reason=f"new model failed to load: {exc}")
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
        entry = self.fire(
            OTAEvent.ACTIVATED,
            reason="watching the new model",
            detail={"restarts": 0, "probation_baseline": baseline.to_dict()},
        )
        self._start_watch(entry)
        self._start_probation_shadow(pkg.manifest)
        self._clean_staging_extracts()
        kill_point("activate.done")
        return entry

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
