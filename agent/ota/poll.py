"""The poll loop: check, download and install on every poll interval."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

from agent.errors import EdgeAgentError, FetchError, OTAError
from agent.ota.channel import ChannelClient
from agent.ota.decide import ChannelCheck, CheckResult
from agent.ota.download import download_target
from agent.ota.install_flow import InstallFlow
from agent.ota.journal import LAST_POLL
from agent.ota.membership import poll_delay_s
from agent.ota.startup import StartupRecovery
from agent.ota.states import OTAEvent

log = logging.getLogger(__name__)


class PollLoop(ChannelCheck, InstallFlow, StartupRecovery):
    """update_now and the loop that runs it until the agent stops."""

    def update_now(self, client: ChannelClient | None = None) -> CheckResult:
        """Check, and when the channel offers this device a release, download and install it."""
        client = client or self.channel_client()
        decision = self.check(client, proceed=True)
        if not decision.take or decision.document is None or decision.package_ref is None:
            return decision
        doc, ref = decision.document, decision.package_ref
        with self._lock:
            self.fire(
                OTAEvent.DOWNLOAD_STARTED,
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
                self.fire(OTAEvent.DOWNLOAD_FAILED, reason=f"download failed, will retry: {exc}")
                raise
        self.install_file(path, channel=doc)
        path.unlink(missing_ok=True)
        return decision

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
