"""The daemon link: control-socket handlers and the poll thread of a running agent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.errors import ConfigError, EdgeAgentError, StateError
from agent.ota import install
from agent.ota.startup import _RECOVERED_AT_START, check_state_files
from agent.ota.states import OTAState

if TYPE_CHECKING:
    from agent.ota.service import OTAService

log = logging.getLogger(__name__)

# how long a stop waits for the poll thread to bring a download or gate to rest
STOP_JOIN_S = 5.0


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


def attach(daemon: Any) -> AttachedOTA:
    """Register ``install``, ``update`` and ``rollback`` on the daemon's control socket,
    recover the journal, re-arm probation, and start the poll loop when a repository is set.

    The daemon should call ``attached.service.observe_frame(latency_s, confidence, error)``
    once per frame so probation can end in a commit or a rollback.
    """
    from agent.ota.service import OTAService  # the whole service; it imports this module

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
