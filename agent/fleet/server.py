"""The reference fleet server: repository files, OTLP ingest, rollout status and the controller."""

from __future__ import annotations

import gzip
import html
import json
import logging
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError, TelemetryError
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import utc_now
from agent.fleet.rollout import (
    RolloutState,
    count_reports,
    evaluate,
    list_states,
    run_controller_once,
)
from agent.fleet.store import BadPayloadError, TelemetryStore, parse_otlp_logs, parse_otlp_metrics
from agent.fleet.tokens import device_for_token, load_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """What `edge-agent serve` needs; defaults suit one small box."""

    repo_dir: Path
    db_url: str
    tokens_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 << 20
    max_decompressed_bytes: int = 16 << 20
    controller_interval_s: float = 60.0
    chart_points: int = 40


# ---------------------------------------------------------------------------------------
# Rollout status (plain data, used by the JSON API, the web page and the CLI)
# ---------------------------------------------------------------------------------------


def rollout_status(state: RolloutState, store: TelemetryStore, now: datetime) -> dict[str, Any]:
    decision = evaluate(state, store, now)
    counts = count_reports(state, store)
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


def render_status_page(statuses: Sequence[dict[str, Any]], charts: Sequence[str]) -> str:
    rows = []
    for st, chart in zip(statuses, charts):
        state = (
            "aborted"
            if st["aborted"]
            else "complete"
            if st["completed"]
            else ("paused" if st["paused"] else "running")
        )
        versions = "".join(
            f"<tr><td>{html.escape(v['version'])}</td><td>{html.escape(v['state'])}</td>"
            f"<td>{v['devices']}</td></tr>"
            for v in st["devices_by_version_state"]
        )
        rows.append(
            f'<section class="rollout" id="channel-{html.escape(st["channel"])}">'
            f"<h2>{html.escape(st['channel'])}: {html.escape(st['package'])} "
            f"{html.escape(st['version'])}</h2>"
            '<table class="summary"><tr><th>state</th><th>stage</th><th>percent</th>'
            "<th>committed</th><th>failed</th><th>failure rate</th><th>next</th>"
            "<th>soak left</th></tr>"
            f'<tr><td class="state">{state}</td><td>{st["stage"] + 1}/'
            f'{len(st["stages_percent"])}</td><td class="percent">{st["percent"]:g}%</td>'
            f'<td class="committed">{st["committed"]}</td><td class="failed">{st["failed"]}</td>'
            f"<td>{st['failure_rate']:.1%}</td><td>{html.escape(st['next_decision'])}: "
            f"{html.escape(st['next_reason'])}</td><td>{st['soak_left_s']:.0f} s</td></tr>"
            "</table>"
            '<table class="versions"><tr><th>version</th><th>state</th><th>devices</th></tr>'
            f"{versions}</table>{chart}</section>"
        )
    body = "".join(rows) or "<p>No rollouts yet.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='15'><title>edge-agent fleet</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}</style></head>"
        f"<body><h1>edge-agent fleet status</h1>{body}</body></html>"
    )


# ---------------------------------------------------------------------------------------
# The web application
# ---------------------------------------------------------------------------------------


class ControllerThread(threading.Thread):
    """Runs the rollout controller every interval until stopped."""

    def __init__(self, config: ServerConfig, store: TelemetryStore, keys: Sequence[OperatorKey]):
        super().__init__(name="rollout-controller", daemon=True)
        self.config, self.store, self.keys = config, store, keys
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.config.controller_interval_s):
            try:
                run_controller_once(self.config.repo_dir, self.store, self.keys)
            except EdgeAgentError as exc:
                log.error("rollout controller: %s", exc)
            except Exception:  # the server must outlive one bad pass
                log.exception("rollout controller pass failed")


def create_app(
    config: ServerConfig, store: TelemetryStore, keys: Sequence[OperatorKey] = ()
) -> Any:
    """The FastAPI app; keys (rollout, snapshot, timestamp) enable the scheduled controller."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.staticfiles import StaticFiles

    tokens = load_tokens(config.tokens_path) if config.tokens_path else {}
    controller = ControllerThread(config, store, keys) if keys else None

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        if controller is not None:
            controller.start()
        yield
        if controller is not None:
            controller.stop_event.set()

    app = FastAPI(title="edge-agent fleet server", lifespan=lifespan, docs_url=None, redoc_url=None)
    for sub in ("metadata", "targets"):
        folder = config.repo_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        app.mount(f"/{sub}", StaticFiles(directory=folder), name=sub)

    def problem(status: int, message: str, request: Request) -> JSONResponse:
        client = request.client.host if request.client else "?"
        log.warning(
            "%s %s from %s: %d %s", request.method, request.url.path, client, status, message
        )
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            return problem(413, f"body over {config.max_body_bytes} bytes", request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                return problem(413, f"body over {config.max_body_bytes} bytes", request)
            chunks.append(chunk)
        body = b"".join(chunks)
        if request.headers.get("content-encoding", "").lower() == "gzip":
            try:
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = inflater.decompress(body, config.max_decompressed_bytes + 1)
                if len(body) > config.max_decompressed_bytes or inflater.unconsumed_tail:
                    return problem(413, "gzip body inflates past the limit", request)
            except zlib.error:
                return problem(400, "body is not valid gzip", request)
        return body

    def authenticate(request: Request) -> str | JSONResponse:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        device = device_for_token(tokens, token.strip()) if scheme.lower() == "bearer" else None
        if device is None:
            return problem(401, "missing or unknown device token", request)
        return device

    async def ingest(request: Request, kind: str) -> JSONResponse:
        device = authenticate(request)
        if isinstance(device, JSONResponse):
            return device
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        if "json" not in request.headers.get("content-type", "application/json"):
            return problem(415, "only OTLP/JSON (application/json) is accepted", request)
        try:
            payload = json.loads(body)
            rows: Any = parse_otlp_logs(payload) if kind == "logs" else parse_otlp_metrics(payload)
        except ValueError as exc:  # BadPayloadError is not a ValueError; JSON errors are
            return problem(400, f"body is not JSON ({exc})", request)
        except BadPayloadError as exc:
            return problem(400, str(exc), request)
        strangers = {r.device_id for r in rows} - {device}
        if strangers:
            return problem(
                403, f"token of {device!r} cannot write for {sorted(strangers)[0]!r}", request
            )
        try:
            result = store.insert_logs(rows) if kind == "logs" else store.insert_metrics(rows)
        except TelemetryError as exc:
            log.error("%s", exc)
            return JSONResponse(
                {"error": "storage unavailable"}, status_code=503, headers={"Retry-After": "5"}
            )
        # OTLP/JSON success response; duplicates are accepted (the device may delete them).
        return JSONResponse(
            {"partialSuccess": {}, "accepted": result.accepted, "duplicates": result.duplicates}
        )

    @app.post("/v1/logs")
    async def v1_logs(request: Request) -> JSONResponse:
        return await ingest(request, "logs")

    @app.post("/v1/metrics")
    async def v1_metrics(request: Request) -> JSONResponse:
        return await ingest(request, "metrics")

    def statuses() -> list[dict[str, Any]]:
        now = utc_now()
        return [rollout_status(s, store, now) for s in list_states(config.repo_dir)]

    @app.get("/api/rollouts")
    def api_rollouts() -> JSONResponse:
        return JSONResponse({"rollouts": statuses()})

    @app.get("/api/rollouts/{channel}")
    def api_rollout(channel: str) -> JSONResponse:
        for st in statuses():
            if st["channel"] == channel:
                return JSONResponse(st)
        return JSONResponse({"error": f"no rollout for channel {channel!r}"}, status_code=404)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ok": True, "devices": len(store.known_devices())})

    @app.get("/", response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        sts = statuses()
        now_ns = time.time_ns()
        charts = []
        for st in sts:
            times, series = store.version_timeline(st["package"], config.chart_points, now_ns)
            charts.append(render_chart_svg(times, series, f"{st['package']} versions over time"))
        return HTMLResponse(render_status_page(sts, charts))

    return app


def serve(config: ServerConfig, store: TelemetryStore, keys: Sequence[OperatorKey]) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    app = create_app(config, store, keys)
    log.info("serving %s on http://%s:%d", config.repo_dir, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)


def gzip_json(payload: Any) -> bytes:
    """OTLP/JSON body gzip-compressed (used by tests and the fleet benchmark)."""
    return gzip.compress(json.dumps(payload).encode())
