"""Shared helpers for telemetry tests (and the telemetry benchmarks): a real OTLP/HTTP
receiver on 127.0.0.1 that validates payloads with the opentelemetry-proto types and can
fail, delay, trickle and reset on command."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

# An action for one request: "ok", "garbage" (200 with a non-JSON body), ("status", code,
# retry_after or None), "reset_before" (drop the connection before processing),
# "reset_after" (process, then drop: the ack is lost), ("delay", seconds),
# ("trickle", seconds_per_byte), ("partial", n) (200 saying n items were rejected).
Action = Any
Plan = Callable[[str, int], Action]


def _attr(attributes: Any, key: str) -> Any:
    for kv in attributes:
        if kv.key == key:
            value = kv.value
            return getattr(value, value.WhichOneof("value"))
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and abandoned requests are the point of these tests, not news


@dataclass
class Received:
    keys: list[tuple[str, str, int]] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    metrics_requests: list[Any] = field(default_factory=list)
    requests: list[tuple[str, Action]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class OtlpReceiver:
    """A ThreadingHTTPServer that plays an OpenTelemetry Collector's OTLP/HTTP endpoint."""

    def __init__(self, plan: Plan | None = None, port: int = 0) -> None:
        self.plan: Plan = plan or (lambda path, index: "ok")
        self.received = Received()
        self.lock = threading.Lock()
        self.count = 0
        self.stopped = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()

            def do_POST(self) -> None:
                receiver.handle(self)

        self.server = _QuietServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.server.shutdown()
        self.server.server_close()

    def unique_keys(self) -> set[tuple[str, str, int]]:
        with self.lock:
            return set(self.received.keys)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            index = self.count
            self.count += 1
        action = self.plan(h.path, index)
        length = int(h.headers.get("Content-Length", "0"))
        body = h.rfile.read(length)
        with self.lock:
            self.received.requests.append((h.path, action))
            self.received.headers.append(dict(h.headers.items()))
        if action == "reset_before":
            self._reset(h)
            return
        if isinstance(action, tuple) and action[0] == "status":
            extra = {"Retry-After": str(action[2])} if action[2] is not None else {}
            self._reply(h, action[1], b'{"message":"injected"}', extra)
            return
        if isinstance(action, tuple) and action[0] == "delay":
            time.sleep(action[1])
        try:
            self._accept(h.path, h.headers.get("Content-Encoding"), body)
        except Exception as exc:  # a payload the proto types refuse is a 400, as a Collector does
            with self.lock:
                self.received.errors.append(f"{h.path}: {exc}")
            self._reply(h, 400, b'{"message":"bad payload"}', {})
            return
        if action == "reset_after":
            self._reset(h)
        elif isinstance(action, tuple) and action[0] == "partial":
            # accepted, but the server says it dropped some items (OTLP partialSuccess)
            key = "rejectedDataPoints" if h.path == "/v1/metrics" else "rejectedLogRecords"
            body = json.dumps({"partialSuccess": {key: str(action[1]), "errorMessage": "x"}})
            self._reply(h, 200, body.encode(), {"Content-Type": "application/json"})
        elif action == "garbage":
            self._reply(h, 200, b"\x00\xffnot json at all", {"Content-Type": "application/json"})
        elif isinstance(action, tuple) and action[0] == "trickle":
            response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            try:
                for byte in response:
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    time.sleep(action[1])
            except OSError:
                pass
            h.close_connection = True
        else:
            self._reply(h, 200, b"{}", {"Content-Type": "application/json"})

    def _accept(self, path: str, encoding: str | None, body: bytes) -> None:
        raw = gzip.decompress(body) if encoding == "gzip" else body
        text = raw.decode("utf-8")
        # strict JSON, as a Collector's parser is: a NaN or Infinity literal is a 400
        json.loads(text, parse_constant=_refuse_constant)
        if path == "/v1/logs":
            msg = json_format.Parse(text, ExportLogsServiceRequest())
            keys = []
            records = []
            for rl in msg.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        keys.append(
                            (
                                _attr(rec.attributes, "edge_agent.device_id"),
                                _attr(rec.attributes, "edge_agent.boot_id"),
                                _attr(rec.attributes, "edge_agent.seq"),
                            )
                        )
                        records.append(rec)
            with self.lock:
                self.received.keys += keys
                self.received.records += records
        elif path == "/v1/metrics":
            msg2 = json_format.Parse(text, ExportMetricsServiceRequest())
            with self.lock:
                self.received.metrics_requests.append(msg2)
        else:
            raise ValueError(f"unknown path {path}")

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, code: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(code)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        # SO_LINGER 0 makes close() send a TCP RST: a connection reset mid-request.
        conn: socket.socket = h.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        h.close_connection = True


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., OtlpReceiver]]:
    """make_receiver(plan=None, port=0) -> a started receiver, stopped after the test."""
    started: list[OtlpReceiver] = []

    def make(plan: Plan | None = None, port: int = 0) -> OtlpReceiver:
        server = OtlpReceiver(plan, port).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "telemetry.db"
