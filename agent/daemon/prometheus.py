"""The Prometheus endpoint: status figures as text exposition on 127.0.0.1:/metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import StateError
from agent.health.governor import PAUSED

if TYPE_CHECKING:  # the metrics endpoint imports http.server only when it is configured
    from http.server import ThreadingHTTPServer


def prometheus_text(snap: Mapping[str, Any]) -> str:
    """The status figures in the Prometheus text exposition format."""
    model = snap.get("model") or {}
    labels = f'model="{model.get("name", "")}",version="{model.get("version", "")}"'
    lines = [
        "# TYPE edge_agent_fps gauge",
        f"edge_agent_fps{{{labels}}} {snap.get('fps', 0)}",
        "# TYPE edge_agent_fps_cap gauge",
        f"edge_agent_fps_cap {snap.get('fps_cap', 0)}",
        "# TYPE edge_agent_frames_total counter",
        f"edge_agent_frames_total {snap.get('frames', 0)}",
        "# TYPE edge_agent_errors_total counter",
        f"edge_agent_errors_total {snap.get('errors', 0)}",
        "# TYPE edge_agent_sink_dropped_total counter",
        f"edge_agent_sink_dropped_total {snap.get('dropped', 0)}",
        "# TYPE edge_agent_latency_ms gauge",
    ]
    quantiles = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
    for key, value in (snap.get("latency_ms") or {}).items():
        if value is not None and key in quantiles:
            lines.append(f'edge_agent_latency_ms{{quantile="{quantiles[key]}"}} {value}')
    lines.append("# TYPE edge_agent_temperature_c gauge")
    for zone, temp in (snap.get("temps_c") or {}).items():
        lines.append(f'edge_agent_temperature_c{{zone="{zone}"}} {temp}')
    paused = 1 if (snap.get("governor") or {}).get("state") == PAUSED else 0
    lines += ["# TYPE edge_agent_paused gauge", f"edge_agent_paused {paused}"]
    return "\n".join(lines) + "\n"


def start_metrics_server(
    port: int, snapshot: Callable[[], Mapping[str, Any]]
) -> ThreadingHTTPServer:
    """Serve ``prometheus_text(snapshot())`` at 127.0.0.1:<port>/metrics on its own thread."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            # a fresh snapshot: it costs microseconds, a cached one lags a tick
            body = prometheus_text(snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), MetricsHandler)
    except OSError as exc:
        raise StateError(f"status.prometheus_port {port}: cannot listen ({exc.strerror})") from None
    threading.Thread(target=server.serve_forever, name="prometheus", daemon=True).start()
    return server
