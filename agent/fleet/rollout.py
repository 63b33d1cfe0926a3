"""Staged rollouts: the pure promote/abort decision, the rollout state file and channel updates."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent.errors import ConfigError, RepositoryError, UsageError
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import (
    RELEASE_ROLE,
    LoadedRepo,
    RepoExpiry,
    check_channel_name,
    load_repo,
    published_packages,
    read_channel,
    semver_key,
    utc_now,
    write_channel,
)
from agent.textio import file_lock, write_atomic

if TYPE_CHECKING:
    from agent.fleet.store import QualityRow

log = logging.getLogger(__name__)

Action = Literal["wait", "promote", "abort", "complete", "hold", "none"]

# ota.state values (CONTRACTS.md) that count as a failed install of the release.
FAILED_STATES = frozenset({"REJECTED", "ROLLED_BACK"})
SUCCESS_STATES = frozenset({"COMMITTED"})


@dataclass(frozen=True)
class FigureRule:
    """How one quality threshold reads the figure devices report (``quality.<figure>``).

    ``compare`` "ratio" divides by, and "delta" subtracts, the same device's figure on the
    release it came from (its newest COMMITTED report of that version); ``valid`` is the
    range a real figure can take: a report outside it is not counted either way.
    """

    figure: str
    threshold: str  # the QualityPolicy field
    kind: Literal["min", "max"]
    compare: Literal["value", "ratio", "delta"] = "value"
    valid: tuple[float, float] = (-math.inf, math.inf)


# The quality checks, in the order the controller reports them (CONTRACTS.md names).
FIGURE_RULES = (
    FigureRule("shadow_agreement", "shadow_agreement_min", "min", valid=(0.0, 1.0)),
    FigureRule("confidence_delta", "confidence_delta_min", "min", valid=(-1.0, 1.0)),
    FigureRule("class_hist_distance", "class_hist_distance_max", "max", valid=(0.0, 1.0)),
    FigureRule("drift_psi", "drift_psi_max", "max", valid=(0.0, math.inf)),
    FigureRule("gate_margin", "gate_margin_min", "min"),
    FigureRule("latency_p95_ms", "latency_p95_ratio_max", "max", "ratio", valid=(0.0, math.inf)),
    FigureRule("fps", "fps_ratio_min", "min", "ratio", valid=(0.0, math.inf)),
    FigureRule("error_rate", "error_rate_max", "max", "delta", valid=(0.0, 1.0)),
)


@dataclass(frozen=True)
class QualityPolicy:
    """The channel's quality thresholds (the rollout policy's ``quality:`` section).

    Each threshold is off (None) until set. A figure counts once ``min_devices`` members of
    the stage reported it (capped at the stage's known members, like install reports); the
    stage is aborted when more than ``max_breaching_pct`` percent of the members reporting
    it breach it, or when more breach it than that share of the whole stage allows.
    """

    shadow_agreement_min: float | None = None  # top-1 agreement new vs old on live frames
    confidence_delta_min: float | None = None  # new mean confidence minus old
    class_hist_distance_max: float | None = None  # total variation of the class histograms
    drift_psi_max: float | None = None  # live vs golden-set PSI of the class histogram
    gate_margin_min: float | None = None  # the gate's smallest margin to a failing threshold
    latency_p95_ratio_max: float | None = None  # p95 over the device's p95 on the old release
    fps_ratio_min: float | None = None  # FPS over the device's FPS on the old release
    error_rate_max: float | None = None  # errors per frame added over the old release
    min_devices: int = 2
    max_breaching_pct: float = 10.0

    def rules(self) -> list[tuple[FigureRule, float]]:
        """The checks that are on, with their thresholds."""
        out = []
        for rule in FIGURE_RULES:
            threshold = getattr(self, rule.threshold)
            if threshold is not None:
                out.append((rule, float(threshold)))
        return out

    def check(self) -> str | None:
        for rule in FIGURE_RULES:
            value = getattr(self, rule.threshold)
            if value is not None and not math.isfinite(value):
                return f"{rule.threshold}: must be a finite number"
        if self.min_devices < 1:
            return "min_devices: must be at least 1"
        if not 0 <= self.max_breaching_pct < 100:
            return "max_breaching_pct: must be in [0, 100)"
        return None


@dataclass(frozen=True)
class RolloutPolicy:
    """When a stage may be promoted or must be aborted."""

    stages_percent: tuple[float, ...] = (1.0, 10.0, 100.0)
    soak_s: float = 3600.0
    # Reports (COMMITTED or failed) needed before promotion; capped at the number of known
    # devices that fall into the stage, so a small fleet is not stuck at 1 %.
    min_devices: int = 2
    max_failure_rate: float = 0.05
    auto_promote: bool = True
    auto_abort: bool = True
    quality: QualityPolicy = field(default_factory=QualityPolicy)

    def check(self) -> str | None:
        stages = self.stages_percent
        if not stages or any(not 0 < p <= 100 for p in stages):
            return "stages_percent: each stage must be in (0, 100]"
        if list(stages) != sorted(set(stages)):
            return "stages_percent: stages must increase"
        if stages[-1] != 100.0:
            return "stages_percent: the last stage must be 100"
        if self.soak_s < 0:
            return "soak_s: must not be negative"
        if self.min_devices < 1:
            return "min_devices: must be at least 1"
        if not 0 <= self.max_failure_rate < 1:
            return "max_failure_rate: must be in [0, 1)"
        problem = self.quality.check()
        return f"quality.{problem}" if problem else None


@dataclass(frozen=True)
class FigureCount:
    """One quality check over a stage: members reporting the figure, and those breaching."""

    figure: str
    threshold: float
    kind: Literal["min", "max"]
    compare: Literal["value", "ratio", "delta"]
    reporting: int = 0
    breaching: int = 0
    # the lowest (min checks) or highest (max checks) compared value among the reports
    worst: float | None = None

    def describe(self) -> str:
        what = {"value": "", "ratio": " ratio to the old release", "delta": " rise"}[self.compare]
        side = "under" if self.kind == "min" else "over"
        return (
            f"{self.figure}{what} {side} {self.threshold:g} on {self.breaching} of "
            f"{self.reporting} reporting devices"
        )


@dataclass(frozen=True)
class StageCounts:
    """What the devices of a release reported; members_known is None when the fleet is unknown."""

    committed: int = 0
    failed: int = 0
    in_progress: int = 0
    members_known: int | None = None
    quality: tuple[FigureCount, ...] = ()


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    stage: int
    percent: float
    committed: int
    failed: int
    reports: int
    required_reports: int
    failure_rate: float
    soak_left_s: float
    # the quality check that decided an abort (or hold), when one did
    breached: FigureCount | None = None

    def describe(self) -> str:
        return (
            f"{self.action}: {self.reason} (stage {self.stage} at {self.percent:g}%, "
            f"committed={self.committed} failed={self.failed} reports={self.reports}/"
            f"{self.required_reports} failure_rate={self.failure_rate:.3f} "
            f"soak_left_s={self.soak_left_s:.0f})"
        )


def quality_breach(policy: QualityPolicy, counts: StageCounts) -> FigureCount | None:
    """The first quality check the stage's reports break, None when none does.

    Like failures: breaches by more than ``max_breaching_pct`` of the whole stage cannot be
    outvoted by reports still to come; otherwise a figure is judged once ``min_devices``
    (capped at the stage's known members) reported it, against the share of its reporters.
    """
    share = policy.max_breaching_pct / 100.0
    required = policy.min_devices
    if counts.members_known is not None and counts.members_known > 0:
        required = min(policy.min_devices, counts.members_known)
    for figure in counts.quality:
        if not figure.breaching:
            continue
        over_whole_stage = counts.members_known is not None and figure.breaching > share * max(
            counts.members_known, figure.reporting
        )
        over_share = figure.reporting >= required and figure.breaching > share * figure.reporting
        if over_whole_stage or over_share:
            return figure
    return None


def decide(
    policy: RolloutPolicy,
    stage: int,
    stage_elapsed_s: float,
    counts: StageCounts,
    paused: bool = False,
    aborted: bool = False,
    completed: bool = False,
) -> Decision:
    """The controller's whole judgement: a pure function of the stage, its age and the counts."""
    percent = policy.stages_percent[min(stage, len(policy.stages_percent) - 1)]
    reports = counts.committed + counts.failed
    required = policy.min_devices
    if counts.members_known is not None and counts.members_known > 0:
        required = min(policy.min_devices, counts.members_known)
    rate = counts.failed / reports if reports else 0.0
    soak_left = max(0.0, policy.soak_s - stage_elapsed_s)

    def make(action: Action, reason: str, breached: FigureCount | None = None) -> Decision:
        return Decision(
            action,
            reason,
            stage,
            percent,
            counts.committed,
            counts.failed,
            reports,
            required,
            rate,
            soak_left,
            breached,
        )

    if aborted:
        return make("none", "rollout was aborted")
    if completed:
        return make("none", "rollout is complete")
    # Failures of more than the allowed share of the whole stage cannot be outvoted by the
    # reports still to come; otherwise judge the rate once enough devices have reported.
    allowed_failures = policy.max_failure_rate * max(counts.members_known or 0, reports)
    over_whole_stage = counts.members_known is not None and counts.failed > allowed_failures
    over_rate = reports >= required and rate > policy.max_failure_rate
    if counts.failed and (over_whole_stage or over_rate):
        if policy.auto_abort and not paused:
            return make("abort", f"failure rate over {policy.max_failure_rate:.3f}")
        return make("hold", f"failure rate over {policy.max_failure_rate:.3f}; abort by hand")
    breached = quality_breach(policy.quality, counts)
    if breached is not None:
        reason = f"quality: {breached.describe()} (max {policy.quality.max_breaching_pct:g}%)"
        if policy.auto_abort and not paused:
            return make("abort", reason, breached)
        return make("hold", f"{reason}; abort by hand", breached)
    if paused:
        return make("hold", "rollout is paused")
    if counts.members_known == 0:
        return make("wait", "no known device falls into this stage yet")
    if reports < required:
        return make("wait", f"{reports} of {required} devices have reported")
    if soak_left > 0:
        return make("wait", "stage is soaking")
    if stage >= len(policy.stages_percent) - 1:
        return make("complete", "last stage soaked with failures under the threshold")
    if not policy.auto_promote:
        return make("hold", "ready to promote; auto-promote is off")
    return make("promote", "soaked with enough reports and failures under the threshold")


def member_bucket(device_id: str, salt: str) -> int:
    """CONTRACTS.md membership bucket in [0, 10000)."""
    return int(hashlib.sha256(f"{device_id}:{salt}".encode()).hexdigest()[:8], 16) % 10000


def is_member(device_id: str, salt: str, percent: float) -> bool:
    return member_bucket(device_id, salt) < percent * 100


# ---------------------------------------------------------------------------------------
# Rollout state kept beside the repository (not served to devices)
# ---------------------------------------------------------------------------------------


@dataclass
class RolloutState:
    channel: str
    package: str
    version: str
    target: str
    release_counter: int
    salt: str
    policy: RolloutPolicy
    stage: int = 0
    started: str = ""
    stage_started: str = ""
    paused: bool = False
    aborted: bool = False
    completed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return self.policy.stages_percent[self.stage]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["policy"]["stages_percent"] = list(self.policy.stages_percent)
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def state_path(base: Path, channel: str) -> Path:
    return base / "rollouts" / f"{check_channel_name(channel)}.json"


def policy_from_mapping(data: Mapping[str, Any], source: str = "rollout policy") -> RolloutPolicy:
    from agent.config import from_mapping

    return from_mapping(RolloutPolicy, dict(data), source=source)


def load_state(base: Path, channel: str) -> RolloutState:
    path = state_path(base, channel)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(
            f"no rollout for channel {channel!r} ({path}); run rollout start"
        ) from None
    except ValueError:
        raise RepositoryError(f"{path}: rollout state is not valid JSON") from None
    try:
        data["policy"] = policy_from_mapping(data["policy"])
        return RolloutState(**data)
    except (KeyError, TypeError, ConfigError) as exc:
        raise RepositoryError(f"{path}: rollout state is malformed ({exc})") from None


def list_states(base: Path) -> list[RolloutState]:
    folder = base / "rollouts"
    if not folder.is_dir():
        return []
    return [load_state(base, p.stem) for p in sorted(folder.glob("*.json"))]


def _save_state(base: Path, state: RolloutState) -> None:
    write_atomic(state_path(base, state.channel), state.to_json())


def _iso(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def channel_doc(state: RolloutState, now: datetime) -> dict[str, Any]:
    """The signed channel document devices follow (CONTRACTS.md)."""
    return {
        "channel": state.channel,
        "package": state.package,
        "release": {
            "version": state.version,
            "target": state.target,
            "release_counter": state.release_counter,
        },
        "rollout": {
            "percent": state.percent,
            "salt": state.salt,
            "stage": state.stage,
            "paused": state.paused,
            "aborted": state.aborted,
        },
        "revert_versions": [state.version] if state.aborted else [],
        "updated": _iso(now),
    }


def _record(state: RolloutState, now: datetime, action: str, reason: str, **numbers: Any) -> None:
    entry = {
        "time": _iso(now),
        "action": action,
        "reason": reason,
        "stage": state.stage,
        "percent": state.percent,
        **numbers,
    }
    state.history.append(entry)
    log.info(
        "rollout %s %s %s: %s %s",
        state.channel,
        state.version,
        action,
        reason,
        " ".join(f"{k}={v}" for k, v in numbers.items()),
    )


def _publish(
    base: Path,
    state: RolloutState,
    keys: Sequence[OperatorKey],
    now: datetime,
    expiry: RepoExpiry | None,
) -> None:
    write_channel(base, channel_doc(state, now), keys, expiry=expiry, now=now)
    _save_state(base, state)


def _revert_published(repo: LoadedRepo, name: str, version: str) -> bool:
    """The release role signs a revert authorisation for ``name`` ``version``."""
    from agent.package.revert import revert_target

    md = repo.delegated.get(RELEASE_ROLE)
    return md is not None and revert_target(name, version) in md.signed.targets


def start_rollout(
    base: Path,
    channel: str,
    version: str,
    keys: Sequence[OperatorKey],
    policy: RolloutPolicy | None = None,
    package: str | None = None,
    salt: str | None = None,
    now: datetime | None = None,
    expiry: RepoExpiry | None = None,
) -> RolloutState:
    """Point a channel at a published release at the first stage, with a fresh salt."""
    policy = policy or RolloutPolicy()
    problem = policy.check()
    if problem:
        raise UsageError(f"rollout policy: {problem}")
    now = now or utc_now()
    check_channel_name(channel)
    repo = load_repo(base)
    current = read_channel(repo, channel)
    name = package or (str(current["package"]) if current else None)
    if name is None:
        candidates = {p.name for p in published_packages(repo) if p.version == version}
        if len(candidates) != 1:
            raise UsageError(f"channel {channel!r} is new: say which package with --package")
        name = candidates.pop()
    if current is not None and current.get("package") != name:
        raise UsageError(
            f"package {name!r} does not match channel {channel!r}, which carries "
            f"{current.get('package')!r}"
        )
    found = [p for p in published_packages(repo, name) if p.version == version]
    if not found:
        raise UsageError(f"{name} {version} is not published in {base}; run publish first")
    pkg = found[0]
    if current is not None:
        cur_version = str(current.get("release", {}).get("version", "0.0.0"))
        if semver_key(version) <= semver_key(cur_version) and not _revert_published(
            repo, name, version
        ):
            raise UsageError(
                f"channel {channel!r} already carries {name} {cur_version}; {version} is not "
                "newer (going back needs a revert signed by the release keys: "
                "package sign-revert, then publish it)"
            )
    state = RolloutState(
        channel=channel,
        package=name,
        version=version,
        target=pkg.target,
        release_counter=pkg.release_counter,
        salt=salt or secrets.token_hex(16),
        policy=policy,
        started=_iso(now),
        stage_started=_iso(now),
    )
    _record(state, now, "start", "operator started the rollout")
    _publish(base, state, keys, now, expiry)
    return state


def _active(base: Path, channel: str) -> RolloutState:
    state = load_state(base, channel)
    if state.aborted:
        raise UsageError(f"rollout of {state.version} on {channel!r} was aborted")
    if state.completed:
        raise UsageError(f"rollout of {state.version} on {channel!r} is already complete")
    return state


def promote(
    base: Path,
    channel: str,
    keys: Sequence[OperatorKey],
    reason: str = "operator",
    now: datetime | None = None,
    expiry: RepoExpiry | None = None,
    **numbers: Any,
) -> RolloutState:
    """Move to the next stage (or mark the last stage complete)."""
    now = now or utc_now()
    with _state_lock(base):
        state = _active(base, channel)
        if state.stage >= len(state.policy.stages_percent) - 1:
            state.completed = True
            _record(state, now, "complete", reason, **numbers)
            _save_state(base, state)
            return state
        # Logged at the stage it leaves, with the numbers that stage earned.
        _record(
            state,
            now,
            "promote",
            reason,
            to_percent=state.policy.stages_percent[state.stage + 1],
            **numbers,
        )
        state.stage += 1
        state.stage_started = _iso(now)
        _publish(base, state, keys, now, expiry)
        return state


def set_paused(
    base: Path,
    channel: str,
    paused: bool,
    keys: Sequence[OperatorKey],
    now: datetime | None = None,
    expiry: RepoExpiry | None = None,
) -> RolloutState:
    now = now or utc_now()
    with _state_lock(base):
        state = _active(base, channel)
        if state.paused == paused:
            raise UsageError(
                f"rollout on {channel!r} is already {'paused' if paused else 'running'}"
            )
        state.paused = paused
        _record(state, now, "pause" if paused else "resume", "operator")
        _publish(base, state, keys, now, expiry)
        return state


def abort(
    base: Path,
    channel: str,
    keys: Sequence[OperatorKey],
    reason: str = "operator",
    now: datetime | None = None,
    expiry: RepoExpiry | None = None,
    **numbers: Any,
) -> RolloutState:
    """Stop the release: devices stop taking it and those on it revert to their previous one."""
    now = now or utc_now()
    with _state_lock(base):
        state = _active(base, channel)
        state.aborted = True
        _record(state, now, "abort", reason, **numbers)
        _publish(base, state, keys, now, expiry)
        return state


@contextmanager
def _state_lock(base: Path) -> Iterator[None]:
    """Serialize rollout state changes (write_channel takes the repository lock inside)."""
    with file_lock(base / ".rollout.lock"):
        yield


# ---------------------------------------------------------------------------------------
# Counting device reports and running the controller
# ---------------------------------------------------------------------------------------


class ReportSource(Protocol):
    """Where the controller reads device state from (the server's telemetry store)."""

    def state_reports(self, package: str, version: str) -> Sequence[tuple[str, str, float]]:
        """(device_id, ota.state, received_s) of each report for this package version, oldest
        first in the device's own order; received_s is the server's clock at arrival."""

    def known_devices(self) -> Iterable[str]:
        """Every device id the server has heard from."""

    def quality_reports(self, package: str, versions: Sequence[str]) -> Sequence[QualityRow]:
        """Every quality figure devices reported on install events of these versions of the
        package, oldest first in the device's own order, with the server's receipt time."""


def stage_start_times_s(state: RolloutState) -> list[float]:
    """When each stage up to the current one started, in seconds since the epoch.

    Stage 0 started with the rollout, each later one at the promote entry that left the
    stage before it. The current stage's start is kept on the state itself, so a history
    that lost entries only makes the rule stricter. Times are kept to the second, so a
    stage's window opens up to a second before its true start.
    """
    current = _parse_iso(state.stage_started).timestamp()
    starts = [_parse_iso(state.started).timestamp() if state.started else current]
    for entry in state.history:
        if len(starts) > state.stage:
            break
        if entry.get("action") == "promote" and isinstance(entry.get("time"), str):
            starts.append(max(starts[-1], _parse_iso(entry["time"]).timestamp()))
    starts += [current] * (state.stage + 1 - len(starts))
    starts = starts[: state.stage + 1]
    starts[-1] = current
    return starts


def count_reports(state: RolloutState, source: ReportSource) -> StageCounts:
    """The stage's counts: only members of the current stage, only reports they made after
    the stage that took them in had started (server receipt time).

    A device outside the stage cannot promote or abort it, whatever it reports; a report
    sent before its sender was in the rollout (an outsider then, or a stale report from
    before the rollout began) does not count either. A canary taken in at 1 % keeps its
    reports through the later stages: it is still a member and reported as one.
    """
    starts = stage_start_times_s(state)
    stages = state.policy.stages_percent[: state.stage + 1]
    since: dict[str, float | None] = {}

    def member_since_s(device: str) -> float | None:
        if device not in since:
            bucket = member_bucket(device, state.salt)
            since[device] = next(
                (start for start, percent in zip(starts, stages) if bucket < percent * 100),
                None,
            )
        return since[device]

    def counted(device: str, received_s: float) -> bool:
        joined_s = member_since_s(device)
        return joined_s is not None and received_s >= joined_s

    states: dict[str, str] = {}
    for device, ota_state, received_s in source.state_reports(state.package, state.version):
        if counted(device, received_s):
            states[device] = ota_state  # rows come oldest first: the newest one stays
    committed = sum(1 for s in states.values() if s in SUCCESS_STATES)
    failed = sum(1 for s in states.values() if s in FAILED_STATES)
    members = sum(1 for d in source.known_devices() if member_since_s(d) is not None)
    quality = count_quality(state, source, counted)
    return StageCounts(committed, failed, len(states) - committed - failed, members, quality)


def count_quality(
    state: RolloutState, source: ReportSource, counted: Callable[[str, float], bool]
) -> tuple[FigureCount, ...]:
    """Each quality check that is on, over the figures the stage's members reported (the
    same rule as install reports: ``counted``); nothing is read when every check is off.

    A device's newest value of each figure for this release counts. Ratio and rise checks
    compare it with the same device's newest figure on the release it came from (its
    ``from_version``, COMMITTED reports only, from any time: that release ran before the
    stage); a device without that figure does not report the check.
    """
    rules = state.policy.quality.rules()
    if not rules:
        return ()
    current: dict[str, dict[str, float]] = {}
    came_from: dict[str, str] = {}
    for row in source.quality_reports(state.package, [state.version]):
        if row.version == state.version and counted(row.device_id, row.received_s):
            current.setdefault(row.device_id, {})[row.name] = row.value
            if row.from_version:
                came_from[row.device_id] = row.from_version
    previous: dict[tuple[str, str], dict[str, float]] = {}
    older = sorted(set(came_from.values()) - {state.version})
    if older and any(rule.compare != "value" for rule, _ in rules):
        for row in source.quality_reports(state.package, older):
            if row.state in SUCCESS_STATES:
                previous.setdefault((row.device_id, row.version), {})[row.name] = row.value
    out = []
    for rule, threshold in rules:
        low, high = rule.valid
        reporting = breaching = 0
        worst: float | None = None
        for device, figures in current.items():
            value = figures.get(rule.figure)
            if value is None or not low <= value <= high:
                continue  # not reported, or no real device could measure that
            measured = value
            if rule.compare != "value":
                old = previous.get((device, came_from.get(device, "")), {}).get(rule.figure)
                if old is not None and not low <= old <= high:
                    old = None
                if rule.compare == "ratio":
                    if old is None or old <= 0:
                        continue
                    measured = value / old
                else:
                    measured = value - (old or 0.0)
            if not math.isfinite(measured):
                continue
            reporting += 1
            if measured < threshold if rule.kind == "min" else measured > threshold:
                breaching += 1
            if worst is None or (measured < worst if rule.kind == "min" else measured > worst):
                worst = measured
        out.append(
            FigureCount(
                rule.figure, threshold, rule.kind, rule.compare, reporting, breaching, worst
            )
        )
    return tuple(out)


def evaluate(state: RolloutState, source: ReportSource, now: datetime) -> Decision:
    elapsed = (now - _parse_iso(state.stage_started)).total_seconds()
    return decide(
        state.policy,
        state.stage,
        elapsed,
        count_reports(state, source),
        paused=state.paused,
        aborted=state.aborted,
        completed=state.completed,
    )


def run_controller_once(
    base: Path,
    source: ReportSource,
    keys: Sequence[OperatorKey],
    now: datetime | None = None,
    expiry: RepoExpiry | None = None,
) -> list[Decision]:
    """One scheduled pass over every channel's rollout; applies promote/abort/complete."""
    now = now or utc_now()
    decisions = []
    for state in list_states(base):
        decision = evaluate(state, source, now)
        decisions.append(decision)
        numbers: dict[str, Any] = {
            "committed": decision.committed,
            "failed": decision.failed,
            "reports": decision.reports,
            "required": decision.required_reports,
            "failure_rate": round(decision.failure_rate, 4),
        }
        if decision.breached is not None:
            numbers.update(
                figure=decision.breached.figure,
                breaching=decision.breached.breaching,
                reporting=decision.breached.reporting,
            )
        if decision.action in ("wait", "hold", "none"):
            log.debug("rollout %s %s %s", state.channel, state.version, decision.describe())
            continue
        log.info("rollout %s %s %s", state.channel, state.version, decision.describe())
        if decision.action == "abort":
            abort(
                base, state.channel, keys, reason=decision.reason, now=now, expiry=expiry, **numbers
            )
        else:
            promote(
                base, state.channel, keys, reason=decision.reason, now=now, expiry=expiry, **numbers
            )
    return decisions
