"""Recovery at start and after a failed step: carry out plan_recovery, clear stale rows."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import EdgeAgentError
from agent.ota import install
from agent.ota.journal import JournalEntry
from agent.ota.killpoint import kill_point
from agent.ota.probation_flow import ProbationFlow
from agent.ota.quarantine import Quarantined, StartCheck, check_state_dir
from agent.ota.recovery import STEP_EVENT, plan_recovery
from agent.ota.recovery import Facts as RecoveryFacts
from agent.ota.recovery import Plan as RecoveryPlan
from agent.ota.recovery import Step as RecoveryStep
from agent.ota.states import AT_REST, RECOVERY, OTAEvent, OTAState, Recovery

log = logging.getLogger(__name__)

# journal value: the seq of an in-flight row the agent left on a clean stop (not a crash)
CLEAN_STOP = "clean_stop_seq"


class StartupRecovery(ProbationFlow):
    """Finishes or undoes what the journal says was in flight."""

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
        """Do what plan_recovery decided (agent/ota/recovery.py), in the journal and links;
        each row written is the one FLOW gives for the step's event (STEP_EVENT)."""
        if plan.step is RecoveryStep.RECORD_ROLLBACK:
            assert switch is not None
            self.fire(STEP_EVENT[plan.step], **switch)
            return
        if last is None or plan.next_state is None:
            return  # nothing to write (nothing in flight, or a CLI during probation)
        if plan.attempts is not None:
            self.journal.set_value(attempts_key, str(plan.attempts))
        if plan.step is RecoveryStep.CRASH_LOOP_ROLLBACK:
            self.rollback(plan.reason, automatic=True, event=STEP_EVENT[plan.step])
            return
        if plan.step is RecoveryStep.UNDO_ACTIVATION:
            before = last.detail.get("links_before") or {}
            install.restore_links(
                self.state_dir,
                install.Links(before.get("current"), before.get("previous")),
            )
        detail = {"restarts": plan.restarts} if plan.restarts is not None else None
        self.fire(STEP_EVENT[plan.step], reason=plan.reason, detail=detail)
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
                self.fire(
                    OTAEvent.ACTIVATION_UNDONE,
                    reason="activation failed to save its state; links restored",
                )
                return "activation undone"
            self.fire(
                OTAEvent.INTERRUPTED,
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
        self.fire(OTAEvent.ROLLBACK_FOUND, **switch)
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

    def mark_clean_stop(self) -> None:
        """On a clean stop: when a row is still in flight (a download or gate that did not
        come to rest in time), note its seq so the next start does not count the stop as
        an interrupted attempt; only crashes feed the breaker."""
        last = self.journal.last()
        if last is not None and RECOVERY[last.state] is Recovery.ABANDON:
            self.journal.set_value(CLEAN_STOP, str(last.seq))


def clear_staging(state_dir: Path) -> None:
    """Remove everything in staging/ (used by tests and `provision --reset`)."""
    shutil.rmtree(state_dir / "staging", ignore_errors=True)


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
    from agent.ota.service import OTAService  # the whole service; it imports this module

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
        from agent.ota.service import OTAService  # the whole service; it imports this module

        service = OTAService(config, recorder=recorder)
        try:
            return service.rebuild_from_links(item)
        finally:
            service.close()

    event = getattr(recorder, "event", None)
    return check_state_dir(config.state_dir, rebuild, event)
