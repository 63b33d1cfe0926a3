"""The reference fleet server (FastAPI): repository files, OTLP ingest, status, controller."""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from agent.errors import EdgeAgentError, TelemetryError
from agent.fleet.ingest import BadPayloadError, parse_otlp_logs, parse_otlp_metrics
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import utc_now
from agent.fleet.rollout import list_states, run_controller_once
from agent.fleet.status import rollout_status
from agent.fleet.store import TelemetryStore
from agent.fleet.tokens import device_for_token, load_operator_tokens, load_tokens
from agent.fleet.web import install_fleet_pages

log = logging.getLogger(__name__)

METADATA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.json", re.ASCII)
MAX_METADATA_RESPONSE_BYTES = 4 << 20


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
    tokens = load_tokens(config.tokens_path) if config.tokens_path else {}
    operators = load_operator_tokens(config.tokens_path) if config.tokens_path else {}
    controller = ControllerThread(config, store, keys) if keys else None

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        if controller is not None:
            controller.start()
        yield
        if controller is not None:
            controller.stop_event.set()

    app = FastAPI(title="edge-agent fleet server", lifespan=lifespan, docs_url=None, redoc_url=None)
    # The fleet page and every read of fleet state need an operator token (agent/fleet/web.py).
    api_guard = install_fleet_pages(app, store, config.repo_dir, operators, config.chart_points)
    _add_repository_routes(app, config.repo_dir)
    _add_ingest_routes(app, config, store, tokens)
    _add_api_routes(app, config, store, api_guard)
    return app


def _add_repository_routes(app: FastAPI, repo_dir: Path) -> None:
    """The TUF metadata and target files devices fetch (no token: they are signed)."""
    metadata_dir = repo_dir / "metadata"
    targets_dir = repo_dir / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)

    @app.get("/metadata/{name}")
    def metadata_file(name: str) -> Response:
        # timestamp.json and root.json are replaced in place: read each in one go, so a
        # client never gets the old file's length with the new file's bytes.
        if not METADATA_NAME_RE.fullmatch(name):
            return JSONResponse({"error": "not found"}, status_code=404)
        try:
            with (metadata_dir / name).open("rb") as fh:
                data = fh.read(MAX_METADATA_RESPONSE_BYTES + 1)
        except OSError:
            return JSONResponse({"error": "not found"}, status_code=404)
        if len(data) > MAX_METADATA_RESPONSE_BYTES:
            return JSONResponse({"error": "metadata file too large"}, status_code=500)
        cache = "no-cache" if name in ("timestamp.json", "root.json") else "max-age=300"
        return Response(data, media_type="application/json", headers={"Cache-Control": cache})

    # Target files are content-addressed (sha256 prefix) and never rewritten: serve statically.
    app.mount("/targets", StaticFiles(directory=targets_dir), name="targets")


def _problem(status: int, message: str, request: Request) -> JSONResponse:
    """The JSON error answer, logged with the request it refuses."""
    client = request.client.host if request.client else "?"
    log.warning("%s %s from %s: %d %s", request.method, request.url.path, client, status, message)
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, config: ServerConfig) -> bytes | JSONResponse:
    """The request body within the size limits, gunzipped; or the 4xx answer to send."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()  # str.isdigit() also takes other scripts' digits
        and declared.isdigit()
        and int(declared) > config.max_body_bytes
    ):
        return _problem(413, f"body over {config.max_body_bytes} bytes", request)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > config.max_body_bytes:
            return _problem(413, f"body over {config.max_body_bytes} bytes", request)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        return _problem(415, f"Content-Encoding {encoding!r} is not supported (gzip)", request)
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        inflated = inflater.decompress(body, config.max_decompressed_bytes + 1)
    except zlib.error as exc:
        return _problem(400, f"body is not valid gzip ({exc})", request)
    if len(inflated) > config.max_decompressed_bytes or inflater.unconsumed_tail:
        return _problem(413, "gzip body inflates past the limit", request)
    if not inflater.eof:
        return _problem(400, "body is not valid gzip (the stream is cut short)", request)
    if inflater.unused_data:
        return _problem(400, "body is not valid gzip (bytes after the stream)", request)
    return inflated


def _add_ingest_routes(
    app: FastAPI, config: ServerConfig, store: TelemetryStore, tokens: Mapping[str, str]
) -> None:
    """POST /v1/logs and /v1/metrics: OTLP/JSON from devices, each with its own token."""

    def authenticate(request: Request) -> str | JSONResponse:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        device = device_for_token(tokens, token.strip()) if scheme.lower() == "bearer" else None
        if device is None:
            return _problem(401, "missing or unknown device token", request)
        return device

    async def ingest(request: Request, kind: str) -> JSONResponse:
        device = authenticate(request)
        if isinstance(device, JSONResponse):
            return device
        body = await _read_body(request, config)
        if isinstance(body, JSONResponse):
            return body
        if not is_json_media_type(request.headers.get("content-type", "application/json")):
            return _problem(415, "only OTLP/JSON (application/json) is accepted", request)
        try:
            payload = json.loads(body)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
            return _problem(400, f"body is not JSON ({_short(exc)})", request)
        except RecursionError:
            return _problem(400, "body is not JSON we accept (nested too deeply)", request)
        try:
            rows: Any = parse_otlp_logs(payload) if kind == "logs" else parse_otlp_metrics(payload)
        except BadPayloadError as exc:
            return _problem(400, str(exc), request)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError):
            # The parser checks every shape it reads; this is the net for one it missed, so
            # a device gets a 400 (it drops the batch) and not a 500 (it would resend forever).
            log.exception("unexpected OTLP body shape")
            return _problem(400, "body does not follow OTLP/JSON", request)
        strangers = {r.device_id for r in rows} - {device}
        if strangers:
            return _problem(
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


def _add_api_routes(
    app: FastAPI,
    config: ServerConfig,
    store: TelemetryStore,
    api_guard: Callable[[Request], JSONResponse | None],
) -> None:
    """The rollout status API (operator token) and the health check."""

    def statuses() -> list[dict[str, Any]]:
        now = utc_now()
        return [rollout_status(s, store, now) for s in list_states(config.repo_dir)]

    @app.get("/api/rollouts")
    def api_rollouts(request: Request) -> JSONResponse:
        if (denied := api_guard(request)) is not None:
            return denied
        return JSONResponse({"rollouts": statuses()})

    @app.get("/api/rollouts/{channel}")
    def api_rollout(request: Request, channel: str) -> JSONResponse:
        if (denied := api_guard(request)) is not None:
            return denied
        for st in statuses():
            if st["channel"] == channel:
                return JSONResponse(st)
        return JSONResponse({"error": f"no rollout for channel {channel!r}"}, status_code=404)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ok": True, "devices": len(store.known_devices())})


def is_json_media_type(content_type: str) -> bool:
    """application/json or any +json type, parameters (charset) ignored."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _short(exc: BaseException, max_chars: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def serve(config: ServerConfig, store: TelemetryStore, keys: Sequence[OperatorKey]) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    app = create_app(config, store, keys)
    log.info(
        "serving %s on http://%s:%d, telemetry in %s",
        config.repo_dir,
        config.host,
        config.port,
        store.where,
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)


def gzip_json(payload: Any) -> bytes:
    """OTLP/JSON body gzip-compressed (used by tests and the fleet benchmark)."""
    return gzip.compress(json.dumps(payload).encode())
