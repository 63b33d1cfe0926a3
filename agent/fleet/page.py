"""The operator's fleet page: device table, device pages, rollout pages, all server-rendered."""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from agent.fleet.charts import fmt_ns, time_series_svg
from agent.fleet.label import rollout_state_word, stage_label
from agent.fleet.rollout import FAILED_STATES, SUCCESS_STATES, RolloutState, evaluate, is_member
from agent.fleet.store import IDLE_STATES, TelemetryStore

# One stylesheet served by the app itself (/static/fleet.css): the CSP allows styles only
# from 'self', so nothing inline and nothing from a CDN.
FLEET_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .5em}h2{font-size:1.15em;margin:1.2em 0 .3em}
nav{display:flex;gap:1.2em;align-items:center;margin-bottom:.8em}
nav form{margin:0 0 0 auto}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
th a{color:inherit}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.state-REJECTED td,tr.state-ROLLED_BACK td,tr.fail td{background:#fde8e8}
tr.state-COMMITTED td.ota-state,tr.pass td.verdict{color:#176b2c}
form.filter{margin:.5em 0}form.filter input,form.filter select{margin-right:.5em}
.muted{color:#777}.charts svg{display:block;margin:.5em 0}
section.rollout{border-top:1px solid #ddd;margin-top:1em}
"""

IDLE = {s.strip("'") for s in IDLE_STATES.strip("()").split(", ")}
SUMMARY_LIMIT = 500
HISTORY_LIMIT = 200


# ---------------------------------------------------------------------------------------
# Data: what the pages show, read from the store (plain values, tested without a browser)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    """One line of the device table."""

    device_id: str
    version: str | None
    ota_state: str | None
    ota_reason: str | None
    last_seen_s: float | None
    fps: float | None
    latency_p95_ms: float | None
    temp_c: float | None
    drift: float | None


SORT_KEYS = (
    "device_id",
    "version",
    "ota_state",
    "last_seen_s",
    "fps",
    "latency_p95_ms",
    "temp_c",
    "drift",
)


def _attr(attrs: Mapping[str, Any], key: str) -> Any:
    return attrs.get(f"edge_agent.attr.{key}")


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _json_attr(attrs: Mapping[str, Any], key: str) -> Any:
    # Non-scalar event attributes travel as JSON strings (CONTRACTS.md, OTLP mapping).
    value = _attr(attrs, key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def hottest_c(attrs: Mapping[str, Any]) -> float | None:
    temps = _json_attr(attrs, "temps_max_c") or _json_attr(attrs, "temps_c")
    if not isinstance(temps, dict):
        return None
    values = [v for v in (_float(t) for t in temps.values()) if v is not None]
    return max(values) if values else None


def drift_of(attrs: Mapping[str, Any]) -> float | None:
    """A drift score when the device reports one: the summary's `drift` figures (class
    PSI, docs/telemetry.md "Drift"), else a plain `drift` or the first `drift_*` number."""
    reported = _json_attr(attrs, "drift")
    if isinstance(reported, dict):
        return _float(reported.get("class_psi"))
    value = _float(reported)
    if value is not None:
        return value
    for key in sorted(attrs):
        if key.startswith("edge_agent.attr.drift_"):
            value = _float(attrs[key])
            if value is not None:
                return value
    return None


def running_version(history: Sequence[Mapping[str, Any]]) -> str | None:
    """What a device runs after its OTA history: version after COMMITTED, from_version after
    ROLLED_BACK (the same reading as the versions chart)."""
    version = None
    for row in history:
        if row["state"] == "COMMITTED" and row["version"]:
            version = row["version"]
        elif row["state"] == "ROLLED_BACK" and row["from_version"]:
            version = row["from_version"]
    return version


def device_rows(store: TelemetryStore) -> list[DeviceRow]:
    seen = store.device_seen()
    summaries = store.latest_summaries()
    histories: dict[str, list[dict[str, Any]]] = {}
    for row in store.ota_history():
        histories.setdefault(row["device_id"], []).append(row)
    out = []
    for device in sorted(set(seen) | set(summaries) | set(histories)):
        history = histories.get(device, [])
        busy = [r for r in history if r["state"] not in IDLE]
        newest = busy[-1] if busy else None
        attrs = summaries.get(device, (0, {}))[1]
        out.append(
            DeviceRow(
                device_id=device,
                version=running_version(history),
                ota_state=newest["state"] if newest else None,
                ota_reason=(newest["reason"] or None) if newest else None,
                last_seen_s=seen[device][1] if device in seen else None,
                fps=_float(_attr(attrs, "fps")),
                latency_p95_ms=_float(_attr(attrs, "latency_p95_ms")),
                temp_c=hottest_c(attrs),
                drift=drift_of(attrs),
            )
        )
    return out


@dataclass(frozen=True)
class DeviceFilter:
    """The device table's query: ?q=&version=&state=&sort=&desc=1."""

    q: str = ""
    version: str = ""
    state: str = ""
    sort: str = "device_id"
    desc: bool = False

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> DeviceFilter:
        sort = params.get("sort", "device_id")
        return cls(
            q=params.get("q", "")[:128],
            version=params.get("version", "")[:64],
            state=params.get("state", "")[:32],
            sort=sort if sort in SORT_KEYS else "device_id",
            desc=params.get("desc", "") in ("1", "true"),
        )

    def query(self, **changes: Any) -> str:
        values = {
            "q": self.q,
            "version": self.version,
            "state": self.state,
            "sort": self.sort,
            "desc": "1" if self.desc else "",
            **changes,
        }
        return urlencode({k: v for k, v in values.items() if v})


def filter_and_sort(rows: Sequence[DeviceRow], flt: DeviceFilter) -> list[DeviceRow]:
    out = [
        r
        for r in rows
        if flt.q.lower() in r.device_id.lower()
        and (not flt.version or r.version == flt.version)
        and (not flt.state or r.ota_state == flt.state)
    ]
    present = [r for r in out if getattr(r, flt.sort) is not None]
    missing = [r for r in out if getattr(r, flt.sort) is None]
    present.sort(key=lambda r: (getattr(r, flt.sort), r.device_id), reverse=flt.desc)
    return present + missing  # rows without the value last, whichever the direction


@dataclass(frozen=True)
class StageRow:
    """One stage of a rollout with the numbers that decide it."""

    index: int
    percent: float
    status: str  # done, current, pending
    members: int
    committed: int
    failed: int
    in_progress: int


def stage_rows(state: RolloutState, store: TelemetryStore) -> list[StageRow]:
    """Every stage's members (known devices inside its percent) and their reports.

    Stages are cumulative (a canary stays in as the percent grows), so a later stage's
    counts include the earlier stages' devices.
    """
    known = store.known_devices()
    states = store.latest_states(state.package, state.version)
    rows = []
    for i, percent in enumerate(state.policy.stages_percent):
        members = {d for d in known if is_member(d, state.salt, percent)}
        reported = {d: s for d, s in states.items() if d in members}
        committed = sum(1 for s in reported.values() if s in SUCCESS_STATES)
        failed = sum(1 for s in reported.values() if s in FAILED_STATES)
        if i < state.stage or (i == state.stage and state.completed):
            status = "done"
        elif i == state.stage:
            status = "aborted" if state.aborted else "current"
        else:
            status = "pending"
        rows.append(
            StageRow(
                i,
                percent,
                status,
                len(members),
                committed,
                failed,
                len(reported) - committed - failed,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 1) -> str:
    return '<span class="muted">-</span>' if value is None else f"{value:.{digits}f}"


def ago(seconds_then: float | None, now_s: float) -> str:
    if seconds_then is None:
        return "never"
    age = max(0.0, now_s - seconds_then)
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    if age < 172800:
        return f"{age / 3600:.1f} h ago"
    return f"{age / 86400:.0f} d ago"


def page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'{refresh}<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/fleet.css">'
        f"<title>{_e(title)}</title></head><body>"
        '<nav><a href="/">fleet</a><a href="/#devices">devices</a>'
        '<form class="logout" method="post" action="/logout"><button>log out</button></form>'
        f"</nav>{body}</body></html>"
    )


NO_QUALITY_CHECKS = '<p class="muted">no quality checks in this rollout\'s policy</p>'


def _quality_html(st: Mapping[str, Any]) -> str:
    """Which quality figure stopped the release, and each quality check of the stage."""
    out = []
    broke = st.get("quality_abort")
    if broke:
        out.append(
            f'<p class="quality-abort">aborted at stage {_e(int(broke["stage"]) + 1)} '
            f"({_e(broke['percent'])}%) on quality: <strong>{_e(broke['figure'])}</strong> "
            f"broke on {_e(broke['breaching'])} of {_e(broke['reporting'])} reporting "
            "devices</p>"
        )
    rows = []
    for f in st.get("quality") or []:
        compare = {"ratio": " × old release", "delta": " over old release"}.get(f["compare"], "")
        side = "≥" if f["kind"] == "min" else "≤"
        css = " fail" if f["breaching"] else ""
        worst = f["worst"]
        threshold = f"{float(f['threshold']):g}"
        rows.append(
            f'<tr class="figure{css}" data-figure="{_e(f["figure"])}"><td>{_e(f["figure"])}</td>'
            f"<td>{side} {_e(threshold)}{compare}</td>"
            f'<td class="num reporting">{_e(f["reporting"])}</td>'
            f'<td class="num breaching">{_e(f["breaching"])}</td>'
            f'<td class="num">{_num(worst, 4)}</td></tr>'
        )
    if rows:
        out.append(
            '<table class="quality"><tr><th>quality figure</th><th>needs</th>'
            "<th>reporting</th><th>breaching</th><th>worst</th></tr>"
            f"{''.join(rows)}</table>"
        )
    return "".join(out)


def _rollout_section(st: Mapping[str, Any], chart: str) -> str:
    channel = _e(st["channel"])
    versions = "".join(
        f"<tr><td>{_e(v['version'])}</td><td>{_e(v['state'])}</td>"
        f'<td class="num">{v["devices"]}</td></tr>'
        for v in st["devices_by_version_state"]
    )
    return (
        f'<section class="rollout" id="channel-{channel}">'
        f'<h2><a href="/fleet/rollouts/{quote(st["channel"])}">{channel}</a>: '
        f"{_e(st['package'])} {_e(st['version'])}</h2>"
        '<table class="summary"><tr><th>state</th><th>stage</th><th>percent</th>'
        "<th>committed</th><th>failed</th><th>failure rate</th><th>next</th>"
        "<th>soak left</th></tr>"
        f'<tr><td class="state">{rollout_state_word(st)}</td>'
        f"<td>{stage_label(st['stage'], len(st['stages_percent']))}</td>"
        f'<td class="percent">{st["percent"]:g}%</td>'
        f'<td class="committed">{st["committed"]}</td><td class="failed">{st["failed"]}</td>'
        f"<td>{st['failure_rate']:.1%} (max {st['max_failure_rate']:.1%})</td>"
        f"<td>{_e(st['next_decision'])}: {_e(st['next_reason'])}</td>"
        f"<td>{st['soak_left_s']:.0f} s</td></tr></table>"
        f"{_quality_html(st)}"
        '<table class="versions"><tr><th>version</th><th>state</th><th>devices</th></tr>'
        f"{versions}</table>{chart}</section>"
    )


_COLUMNS = (
    ("device_id", "device"),
    ("version", "version"),
    ("ota_state", "OTA state"),
    (None, "reason"),
    ("last_seen_s", "last seen"),
    ("fps", "FPS"),
    ("latency_p95_ms", "p95 ms"),
    ("temp_c", "temp °C"),
    ("drift", "drift"),
)


def _device_table(
    rows: Sequence[DeviceRow], everyone: Sequence[DeviceRow], flt: DeviceFilter
) -> str:
    now_s = time.time()
    versions = sorted({r.version for r in everyone if r.version})
    states = sorted({r.ota_state for r in everyone if r.ota_state})

    def options(values: Sequence[str], chosen: str) -> str:
        opts = ['<option value="">any</option>']
        for v in values:
            sel = " selected" if v == chosen else ""
            opts.append(f'<option value="{_e(v)}"{sel}>{_e(v)}</option>')
        return "".join(opts)

    form = (
        '<form class="filter" method="get" action="/#devices">'
        f'<label>device <input name="q" value="{_e(flt.q)}" placeholder="id contains"></label>'
        f'<label>version <select name="version">{options(versions, flt.version)}</select></label>'
        f'<label>OTA state <select name="state">{options(states, flt.state)}</select></label>'
        f'<input type="hidden" name="sort" value="{_e(flt.sort)}">'
        f'<input type="hidden" name="desc" value="{"1" if flt.desc else ""}">'
        '<button type="submit">filter</button> <a href="/#devices">clear</a></form>'
    )
    head = []
    for key, text in _COLUMNS:
        if key is None:
            head.append(f"<th>{text}</th>")
            continue
        desc = flt.sort == key and not flt.desc
        arrow = (" ▼" if flt.desc else " ▲") if flt.sort == key else ""
        link = flt.query(sort=key, desc="1" if desc else "")
        head.append(f'<th data-sort="{key}"><a href="/?{_e(link)}#devices">{text}{arrow}</a></th>')
    body = []
    for r in rows:
        state = _e(r.ota_state or "")
        body.append(
            f'<tr class="device state-{state}" data-device="{_e(r.device_id)}">'
            f'<td><a href="/fleet/devices/{quote(r.device_id, safe="")}">{_e(r.device_id)}</a></td>'
            f'<td>{_e(r.version or "-")}</td><td class="ota-state">{_e(r.ota_state or "-")}</td>'
            f"<td>{_e(r.ota_reason or '')}</td>"
            f'<td title="{_e(fmt_ns(int(r.last_seen_s * 1e9)) if r.last_seen_s else "")}">'
            f"{ago(r.last_seen_s, now_s)}</td>"
            f'<td class="num fps">{_num(r.fps)}</td>'
            f'<td class="num p95">{_num(r.latency_p95_ms, 2)}</td>'
            f'<td class="num temp">{_num(r.temp_c)}</td>'
            f'<td class="num drift">{_num(r.drift, 3)}</td>'
            "</tr>"
        )
    shown = f"{len(rows)} of {len(everyone)} devices"
    return (
        f'<section id="devices"><h2>Devices <span class="muted count">{shown}</span></h2>{form}'
        f'<table class="devices"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def render_overview(
    statuses: Sequence[Mapping[str, Any]],
    charts: Sequence[str],
    rows: Sequence[DeviceRow],
    flt: DeviceFilter,
) -> str:
    rollouts = "".join(_rollout_section(st, chart) for st, chart in zip(statuses, charts))
    body = (
        "<h1>edge-agent fleet status</h1>"
        f"{rollouts or '<p>No rollouts yet.</p>'}"
        f"{_device_table(filter_and_sort(rows, flt), rows, flt)}"
    )
    return page("edge-agent fleet", body)


def _short(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _gate_table(report: Mapping[str, Any] | None, version: Any, passed: Any) -> str:
    if not report:
        return '<p class="gate none">No gate report received from this device yet.</p>'
    raw = report.get("checks")
    checks: list[Any] = raw if isinstance(raw, list) else []
    rows = []
    for c in checks:
        if not isinstance(c, dict):
            continue
        verdict = str(c.get("verdict", ""))
        css = {"pass": "pass", "fail": "fail"}.get(verdict, "skip")
        rows.append(
            f'<tr class="check {css}"><td>{_e(c.get("name"))}</td>'
            f'<td class="num value">{_e(_short(c.get("value")))}</td>'
            f"<td>{_e(c.get('comparison'))}</td>"
            f'<td class="num threshold">{_e(_short(c.get("threshold")))}</td>'
            f'<td class="verdict">{_e(verdict.upper())}</td><td>{_e(c.get("detail"))}</td></tr>'
        )
    verdict = "PASS" if passed else "FAIL"
    return (
        f'<p class="gate">version {_e(version)}: <strong>{verdict}</strong></p>'
        '<table class="gate-checks"><tr><th>check</th><th>value</th><th>needs</th>'
        "<th>threshold</th><th>verdict</th><th>detail</th></tr>"
        f"{''.join(rows)}</table>"
    )


def render_device_page(store: TelemetryStore, device_id: str) -> str | None:
    """A device's OTA history, last gate report and FPS / latency / temperature charts."""
    history = store.ota_history(device_id)
    summaries = store.device_records(device_id, "summary", "inference.summary", SUMMARY_LIMIT)
    seen = store.device_seen().get(device_id)
    if not history and not summaries and seen is None:
        return None
    gates = store.device_records(device_id, "event", "ota.gate_report", 1)
    report = version = passed = None
    if gates:
        attrs = gates[-1][1]
        report = _json_attr(attrs, "report")
        version, passed = _attr(attrs, "version"), _attr(attrs, "passed")
    fps: list[tuple[int, float]] = []
    p95: list[tuple[int, float]] = []
    temps: dict[str, list[tuple[int, float]]] = {}
    for t, attrs in summaries:
        value = _float(_attr(attrs, "fps"))
        if value is not None:
            fps.append((t, value))
        value = _float(_attr(attrs, "latency_p95_ms"))
        if value is not None:
            p95.append((t, value))
        zones = _json_attr(attrs, "temps_max_c") or _json_attr(attrs, "temps_c")
        if isinstance(zones, dict):
            for zone, temp in zones.items():
                value = _float(temp)
                if value is not None:
                    temps.setdefault(str(zone), []).append((t, value))
    charts = "".join(
        (
            time_series_svg({"fps": fps}, title="FPS", unit="frames/s", css_class="chart-fps"),
            time_series_svg(
                {"p95": p95}, title="p95 latency", unit="ms", css_class="chart-latency"
            ),
            time_series_svg(temps, title="temperature", unit="°C", css_class="chart-temperature"),
        )
    )
    rows = []
    for r in reversed(history[-HISTORY_LIMIT:]):
        state = _e(r["state"])
        rows.append(
            f'<tr class="ota state-{state}"><td>{fmt_ns(int(r["time_ns"]))}</td>'
            f"<td>{_e(r['package'])}</td><td>{_e(r['version'])}</td>"
            f'<td>{_e(r["from_version"])}</td><td class="ota-state">{state}</td>'
            f"<td>{_e(r['reason'])}</td><td>{_e(r['channel'])}</td></tr>"
        )
    now_s = time.time()
    body = (
        f'<h1>device <span class="device-id">{_e(device_id)}</span></h1>'
        f"<p>runs {_e(running_version(history) or 'unknown')}; last seen "
        f"{ago(seen[1] if seen else None, now_s)}; {len(summaries)} summaries shown</p>"
        f'<section class="charts"><h2>Inference</h2>{charts}</section>'
        '<section id="gate"><h2>Last gate report</h2>'
        f"{_gate_table(report, version, passed)}</section>"
        '<section id="ota-history"><h2>OTA history</h2>'
        '<table class="ota-history"><tr><th>time (UTC)</th><th>package</th><th>version</th>'
        "<th>from</th><th>state</th><th>reason</th><th>channel</th></tr>"
        f"{''.join(rows) or '<tr><td colspan=7>no OTA events</td></tr>'}</table></section>"
    )
    return page(f"edge-agent device {device_id}", body)


def render_rollout_page(
    state: RolloutState, status: Mapping[str, Any], store: TelemetryStore, now: datetime
) -> str:
    """Each stage with members, committed, failed; the figures behind the next decision;
    the history of actions."""
    decision = evaluate(state, store, now)
    stages = []
    for s in stage_rows(state, store):
        reports = s.committed + s.failed
        rate = f"{s.failed / reports:.1%}" if reports else "-"
        stages.append(
            f'<tr class="stage stage-{s.status}"><td>{s.index + 1}</td>'
            f'<td class="num">{s.percent:g}%</td><td class="status">{s.status}</td>'
            f'<td class="num members">{s.members}</td><td class="num committed">{s.committed}</td>'
            f'<td class="num failed">{s.failed}</td><td class="num">{s.in_progress}</td>'
            f'<td class="num">{rate}</td></tr>'
        )
    p = state.policy
    figures = (
        '<table class="decision">'
        f'<tr><th>next action</th><td class="action">{_e(decision.action)}</td></tr>'
        f"<tr><th>why</th><td>{_e(decision.reason)}</td></tr>"
        f"<tr><th>reports</th><td>{decision.reports} of {decision.required_reports} "
        f"required (min_devices {p.min_devices})</td></tr>"
        f"<tr><th>failure rate</th><td>{decision.failure_rate:.1%} "
        f"(abort over {p.max_failure_rate:.1%})</td></tr>"
        f"<tr><th>soak left</th><td>{decision.soak_left_s:.0f} s of {p.soak_s:g} s</td></tr>"
        f"<tr><th>auto promote / abort</th><td>{'on' if p.auto_promote else 'off'} / "
        f"{'on' if p.auto_abort else 'off'}</td></tr></table>"
    )
    history = []
    for h in reversed(state.history):
        numbers = ", ".join(
            f"{k} {v}"
            for k, v in h.items()
            if k not in ("time", "action", "reason", "stage", "percent")
        )
        history.append(
            f'<tr class="action"><td>{_e(h.get("time"))}</td><td>{_e(h.get("action"))}</td>'
            f"<td>{_e(h.get('reason'))}</td><td>{_e(h.get('percent'))}%</td><td>{_e(numbers)}</td></tr>"
        )
    body = (
        f"<h1>rollout {_e(state.channel)}: {_e(state.package)} {_e(state.version)} "
        f'<span class="muted">{rollout_state_word(status)}</span></h1>'
        '<h2>Stages</h2><table class="stages"><tr><th>stage</th><th>percent</th>'
        "<th>status</th><th>members</th><th>committed</th><th>failed</th><th>in progress</th>"
        f"<th>failure rate</th></tr>{''.join(stages)}</table>"
        f"<h2>Decision</h2>{figures}"
        f"<h2>Quality</h2>{_quality_html(status) or NO_QUALITY_CHECKS}"
        '<h2>History</h2><table class="history"><tr><th>time</th><th>action</th><th>reason</th>'
        f"<th>percent</th><th>numbers</th></tr>{''.join(history)}</table>"
    )
    return page(f"edge-agent rollout {state.channel}", body)


def render_login(next_path: str, error: str = "") -> str:
    message = f'<p class="error">{_e(error)}</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/fleet.css">'
        "<title>edge-agent fleet: log in</title></head><body><h1>edge-agent fleet</h1>"
        f'{message}<form method="post" action="/login">'
        f'<input type="hidden" name="next" value="{_e(next_path)}">'
        '<label>operator token <input type="password" name="token" autocomplete="off" '
        'autofocus></label> <button type="submit">log in</button></form>'
        '<p class="muted">Create one with <code>edge-agent token add --tokens tokens.json '
        "--operator NAME</code> and restart the server.</p></body></html>"
    )
