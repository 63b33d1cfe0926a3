"""Probation of a newly live model: the watch, the shadow beside it, commit or rollback."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError
from agent.ota import install
from agent.ota.journal import JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.probation import Baseline, ProbationPolicy, ProbationResult, ProbationWatch, Verdict
from agent.ota.rollback import Rollback
from agent.ota.shadow import ShadowPolicy, ShadowVerdict
from agent.ota.states import OTAEvent, OTAState
from agent.pipeline.slot import ActiveModel

log = logging.getLogger(__name__)


class ProbationFlow(Rollback):
    """Watches the new model frame by frame and ends probation in a commit or a rollback."""

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
            self.rollback(
                "probation: current model missing",
                automatic=True,
                event=OTAEvent.PROBATION_FAILED,
            )
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
                event=OTAEvent.PROBATION_FAILED,
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
            entry = self.fire(OTAEvent.PROBATION_PASSED, reason=reason, detail=detail)
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
