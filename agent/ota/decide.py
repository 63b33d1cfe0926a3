"""Check and decide: read the channel, and choose whether this device takes its release."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from agent.errors import DowngradeError, EdgeAgentError, FetchError, RefusedError, StateError
from agent.ota import install
from agent.ota.channel import (
    ChannelClient,
    ChannelDocument,
    ChannelNotPublishedError,
    LastKnownGoodClock,
)
from agent.ota.download import TargetRef
from agent.ota.fetch import FetchLimits, HttpFetcher
from agent.ota.journal import LAST_CHECK
from agent.ota.membership import in_rollout, rollout_bucket
from agent.ota.quarantine import check_tuf_root
from agent.ota.rollback import Rollback
from agent.ota.states import AT_REST, OTAEvent, OTAState

log = logging.getLogger(__name__)


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


class ChannelCheck(Rollback):
    """The channel client, the check, and the decision (rollout, floor, pin, revert)."""

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
                self.fire(
                    OTAEvent.FOUND,
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
