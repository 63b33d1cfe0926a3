"""The daemon's link to OTA: the service is imported only when enabled, recovered, attached."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig

if TYPE_CHECKING:
    from agent.daemon.wiring import Daemon

# one logger name for the whole daemon, as before it was split (journal filters use it)
log = logging.getLogger("agent.daemon")


def ota_module(config: AgentConfig) -> Any:
    """agent.ota.service when OTA is on and installed, else None (then nothing of TUF loads)."""
    if not config.ota.enabled:
        return None
    if importlib.util.find_spec("agent.ota.service") is None:
        log.warning("ota: enabled but agent.ota.service is not installed; OTA off")
        return None
    return importlib.import_module("agent.ota.service")


def recover_ota(config: AgentConfig, telemetry: Any) -> None:
    """Finish or undo an interrupted update: called before any model loads, so a package
    that crashes the process on load still counts toward the crash-loop breaker on every
    restart."""
    module = ota_module(config)
    if module is not None and hasattr(module, "recover_at_start"):
        module.recover_at_start(config, telemetry)


def attach_ota(daemon: Daemon) -> tuple[Any, Callable[..., Any] | None]:
    """Attach the OTA service to ``daemon``: (the attached service or None, its per-frame
    probation observer or None)."""
    module = ota_module(daemon.config)
    if module is None:
        return None, None
    attached = module.attach(daemon)
    service = getattr(attached, "service", None)
    return attached, getattr(service, "observe_frame", None)


def probation_status(attached: Any) -> dict[str, Any] | None:
    """The OTA service's live probation / shadow figures (None when none runs)."""
    service = getattr(attached, "service", None)
    status = getattr(service, "probation_status", None)
    if status is None:
        return None
    try:
        result: dict[str, Any] | None = status()
        return result
    except Exception as exc:  # status must always be written
        return {"error": str(exc)}


def close_ota(attached: Any) -> None:
    """Stop the attached service's threads at shutdown; a failure is logged, never raised."""
    if attached is not None and hasattr(attached, "close"):
        try:
            attached.close()
        except Exception:
            log.exception("ota: close failed")
