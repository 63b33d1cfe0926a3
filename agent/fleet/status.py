"""Rollout status as plain data, and the inline SVG chart of versions over time."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from agent.fleet.rollout import FigureCount, RolloutState, count_reports, evaluate
from agent.fleet.store import TelemetryStore


def _figure(count: FigureCount, policy_pct: float) -> dict[str, Any]:
    return {
        "figure": count.figure,
        "kind": count.kind,
        "compare": count.compare,
        "threshold": count.threshold,
        "reporting": count.reporting,
        "breaching": count.breaching,
        "worst": count.worst,
        "max_breaching_pct": policy_pct,
    }


def quality_abort(state: RolloutState) -> dict[str, Any] | None:
    """The quality check that aborted this rollout (from its history), None otherwise."""
    for entry in reversed(state.history):
        if entry.get("action") == "abort":
            if "figure" not in entry:
                return None
            return {
                "figure": entry.get("figure"),
                "breaching": entry.get("breaching"),
                "reporting": entry.get("reporting"),
                "stage": entry.get("stage"),
                "percent": entry.get("percent"),
                "reason": entry.get("reason"),
                "time": entry.get("time"),
            }
    return None


def rollout_status(state: RolloutState, store: TelemetryStore, now: datetime) -> dict[str, Any]:
    decision = evaluate(state, store, now)
    counts = count_reports(state, store)
    pct = state.policy.quality.max_breaching_pct
    by_version_state = [
        {"version": v, "state": s, "devices": n}
        for (v, s), n in sorted(store.state_counts(state.package).items())
    ]
    return {
        "channel": state.channel,
        "package": state.package,
        "version": state.version,
        "stage": state.stage,
        "stages_percent": list(state.policy.stages_percent),
        "percent": state.percent,
        "paused": state.paused,
        "aborted": state.aborted,
        "completed": state.completed,
        "stage_started": state.stage_started,
        "members_known": counts.members_known,
        "committed": counts.committed,
        "failed": counts.failed,
        "in_progress": counts.in_progress,
        "failure_rate": decision.failure_rate,
        "max_failure_rate": state.policy.max_failure_rate,
        "next_decision": decision.action,
        "next_reason": decision.reason,
        "soak_left_s": decision.soak_left_s,
        "required_reports": decision.required_reports,
        "devices_by_version_state": by_version_state,
        "quality": [_figure(c, pct) for c in counts.quality],
        "quality_min_devices": state.policy.quality.min_devices,
        "quality_breached": _figure(decision.breached, pct) if decision.breached else None,
        "quality_abort": quality_abort(state),
        "history": state.history[-20:],
    }


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def render_chart_svg(times: Sequence[int], series: dict[str, list[int]], title: str) -> str:
    """An inline SVG line chart of devices per version over time (no scripts, no CDN)."""
    width, height, pad = 640, 240, 40
    if not times:
        return (
            f'<svg class="versions-chart" width="{width}" height="60" role="img" '
            f'aria-label="{html.escape(title)}"><text x="10" y="30">no device reports yet'
            "</text></svg>"
        )
    peak = max([1, *(max(v) for v in series.values())])
    span = max(1, times[-1] - times[0])

    def xy(i: int, value: int) -> str:
        x = pad + (times[i] - times[0]) / span * (width - 2 * pad)
        y = height - pad - value / peak * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg class="versions-chart" width="{width}" height="{height + 20 * len(series)}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#444"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
        f'<text x="4" y="{pad}" font-size="11">{peak}</text>',
        f'<text x="4" y="{height - pad}" font-size="11">0</text>',
        f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{_fmt_ns(times[0])}</text>',
        f'<text x="{width - pad - 110}" y="{height - pad + 14}" font-size="11">'
        f"{_fmt_ns(times[-1])}</text>",
    ]
    for n, (version, values) in enumerate(sorted(series.items())):
        color = _COLORS[n % len(_COLORS)]
        points = " ".join(xy(i, v) for i, v in enumerate(values))
        parts.append(
            f'<polyline data-version="{html.escape(version)}" fill="none" stroke="{color}" '
            f'stroke-width="2" points="{points}"/>'
        )
        ly = height + 20 * n
        parts.append(f'<rect x="{pad}" y="{ly - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(
            f'<text class="legend" x="{pad + 16}" y="{ly}" font-size="12">'
            f"{html.escape(version)}: {values[-1]} devices now</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _fmt_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
