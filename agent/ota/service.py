"""OTAService: the device side of OTA, composed of one-job parts; the public import path."""

from __future__ import annotations

from agent.ota.attach import (
    STOP_JOIN_S,
    AttachedOTA,
    attach,
    refuse_during_probation,
    require_repository,
)
from agent.ota.context import (
    LIVE_CONFIDENCE_KEEP,
    STAGING_EXTRACT_PREFIX,
    BackendLoader,
    GateRunner,
    load_package_backend,
)
from agent.ota.decide import CheckResult
from agent.ota.gate_process import GateOutcome
from agent.ota.journal import LAST_CHECK, LAST_GATE_REPORT, LAST_POLL
from agent.ota.package_reader import (
    ExtractedPackage,
    ManifestCheck,
    PackageReader,
    read_package_default,
)
from agent.ota.poll import PollLoop
from agent.ota.release_quality import GATE_QUALITY_PREFIX
from agent.ota.startup import CLEAN_STOP, check_state_files, clear_staging, recover_at_start

__all__ = [
    "CLEAN_STOP",
    "GATE_QUALITY_PREFIX",
    "LAST_CHECK",
    "LAST_GATE_REPORT",
    "LAST_POLL",
    "LIVE_CONFIDENCE_KEEP",
    "STAGING_EXTRACT_PREFIX",
    "STOP_JOIN_S",
    "AttachedOTA",
    "BackendLoader",
    "CheckResult",
    "ExtractedPackage",
    "GateOutcome",
    "GateRunner",
    "ManifestCheck",
    "OTAService",
    "PackageReader",
    "attach",
    "check_state_files",
    "clear_staging",
    "load_package_backend",
    "read_package_default",
    "recover_at_start",
    "refuse_during_probation",
    "require_repository",
]


class OTAService(PollLoop):
    """The device side of OTA; one per state directory.

    ``host`` (a ModelHost, agent/ota/host.py: the daemon, or a SlotHost over a bare
    ``slot``) is set when a model runs: activation then loads and warms the new model
    beside the live one and the host swaps it in between two frames. Without either, an
    install only moves the links (the next start loads the new model).

    Its parts are classes in their own modules, each built on the parts it calls, over one
    typed base, ServiceContext (agent/ota/context.py: config, journal, lock, host, model
    loads, ``fire``), so mypy --strict checks every call between them: ReleaseQuality
    (gate figures, drift) < Rollback < ProbationFlow < InstallFlow and StartupRecovery;
    Rollback < ChannelCheck; PollLoop joins ChannelCheck, InstallFlow and StartupRecovery.
    Each step reports an OTAEvent; ``fire`` journals the state that agent/ota/states.py's
    FLOW names for it.
    """
