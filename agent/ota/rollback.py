"""Rollback: switch back to the previous model, on disk and live."""

from __future__ import annotations

from collections.abc import Mapping

from agent.errors import StateError
from agent.ota import install
from agent.ota.journal import JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.release_quality import ReleaseQuality
from agent.ota.states import OTAEvent
from agent.pipeline.slot import ActiveModel


class Rollback(ReleaseQuality):
    """Back to ``previous``: an operator's, the channel's or probation's rollback."""

    def rollback(
        self,
        reason: str = "operator asked",
        automatic: bool = False,
        record_refusal: bool = True,
        quality: Mapping[str, float] | None = None,
        event: OTAEvent = OTAEvent.ROLLBACK,
    ) -> JournalEntry:
        """Switch back to ``previous`` (on disk and, with a host, live between two frames);
        an ``automatic`` rollback also refuses the release left, unless ``record_refusal``
        is False (a latency-only probation failure, which may be retried). ``event`` is why
        (agent/ota/states.py FLOW): an operator's or the channel's ROLLBACK by default."""
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
            entry = self.fire(
                event,
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
