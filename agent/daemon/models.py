"""The daemon's model changes: the first model at start, and a config reload built then applied."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, EdgeAgentError
from agent.health.governor import GovernorThread
from agent.pipeline.model import probe, probe_frame
from agent.pipeline.sinks import Sink
from agent.pipeline.slot import ActiveModel
from agent.pipeline.sources import Source

if TYPE_CHECKING:
    from agent.daemon.wiring import Daemon

# one logger name for the whole daemon, as before it was split (journal filters use it)
log = logging.getLogger("agent.daemon")


def initial_model(daemon: Daemon) -> ActiveModel:
    """The installed package (state_dir/current), else config.model.path."""
    current = daemon.state_dir / "current"
    if current.exists():
        try:
            model = daemon.load_package(current.resolve())
            log.info(
                "model: %s %s from the installed package %s",
                model.name,
                model.version,
                current.resolve(),
            )
            return model
        except EdgeAgentError as exc:
            if daemon.config.model.path is None:
                raise
            log.error("installed package unusable (%s); falling back to model.path", exc)
            daemon.event("error", {"where": "load_package", "message": str(exc)})
    model = daemon.load_configured_model()
    log.info("model: %s from %s", model.name, daemon.config.model.path)
    return model


@dataclass(frozen=True)
class _Built:
    """What a reload built for the new config (None: that part did not change)."""

    model: ActiveModel | None
    sinks: tuple[Sink, ...] | None
    source: Source | None


def reload_config(daemon: Daemon) -> dict[str, Any]:
    """Re-read the config file: build and probe everything new, then apply it between frames.

    Raises EdgeAgentError (nothing applied) when the new config cannot run.
    """
    if daemon.config_path is None:
        raise ConfigError("reload: the daemon was not started from a config file")
    new = load_config(daemon.config_path)
    old = daemon.config
    restart = [
        name
        for name in ("state_dir", "telemetry", "status", "ota", "device_id")
        if getattr(new, name) != getattr(old, name)
    ]
    changed = _apply(daemon, new, old, _build(daemon, new, old))
    log.info(
        "reloaded %s: changed %s%s",
        daemon.config_path,
        ", ".join(changed) or "nothing",
        f"; needs a restart: {', '.join(restart)}" if restart else "",
    )
    return {"ok": True, "changed": changed, "restart_needed": restart}


def _build(daemon: Daemon, new: AgentConfig, old: AgentConfig) -> _Built:
    """The new model, sinks and source, probed; on any failure all of them are closed."""
    model: ActiveModel | None = None
    package_active = daemon.slot.current().manifest is not None
    if not package_active and (new.model != old.model or new.preprocess != old.preprocess):
        model = daemon.load_configured_model(new)
    sinks: tuple[Sink, ...] | None = None
    source: Source | None = None
    try:
        if model is not None or new.source != old.source:
            # One frame of the new source through the new preprocessing and model
            # before anything is applied: a config no frame can pass is refused here,
            # not found frame after frame once it runs.
            live = model or daemon.slot.current()
            recent = daemon.recent_frame() if new.source == old.source else None
            probe(live, probe_frame(new.source, live, recent))
        sinks = daemon._open_sinks(new) if new.sinks != old.sinks else None
        if new.source != old.source or model is not None:
            source = daemon._open_source(new, model or daemon.slot.current())
    except BaseException:
        for s in sinks or ():
            s.close(0.5)
        if model is not None:
            model.backend.close()
        raise
    return _Built(model, sinks, source)


def _apply(daemon: Daemon, new: AgentConfig, old: AgentConfig, built: _Built) -> list[str]:
    """Apply what ``_build`` made, between frames; returns the names of what changed."""
    changed = ["model"] if built.model is not None else []
    daemon.config = dataclasses.replace(
        new,
        state_dir=old.state_dir,
        status=old.status,
        telemetry=old.telemetry,
        ota=old.ota,
        device_id=old.device_id,
    )
    if built.model is not None:
        daemon.swap_model(built.model)
    if built.source is not None:
        daemon._pending_source = built.source
        changed.append("source")
    if built.sinks is not None:
        old_sinks, daemon.sinks = daemon.sinks, built.sinks
        for s in old_sinks:
            s.close(new.scheduler.drain_timeout_s)
        changed.append("sinks")
    if new.scheduler != old.scheduler:
        daemon.scheduler.set_cap(new.scheduler.fps_cap)
        changed.append("scheduler")
    if new.governor != old.governor or new.scheduler.fps_cap != old.scheduler.fps_cap:
        if daemon.governor is not None:
            daemon.governor.stop()
        daemon.governor = GovernorThread(
            new.governor, new.scheduler.fps_cap, daemon.scheduler.set_cap, on_event=daemon.event
        )
        daemon.scheduler.set_cap(new.scheduler.fps_cap)
        daemon.governor.start()
        if new.governor != old.governor:
            changed.append("governor")
    if new.log_level != old.log_level:
        logging.getLogger().setLevel(new.log_level)
        changed.append("log_level")
    return changed
