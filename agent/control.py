"""The daemon's control socket: JSON-lines requests on a Unix socket, dispatched to handlers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import EdgeAgentError, StateError, UsageError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST_BYTES = 1 << 20
CONTROL_SOCKET_NAME = "control.sock"


def control_socket_path(config: AgentConfig) -> Path:
    """Where the daemon listens and where the CLI looks: one answer for both sides.

    ``status.control_socket`` when the config sets it, else ``state_dir/control.sock``.
    """
    return config.status.control_socket or config.state_dir / CONTROL_SOCKET_NAME


class ControlServer:
    """Serves ``{"cmd": NAME, ...}`` requests; each gets one ``{"ok": ..., ...}`` reply line.

    A handler returns a dict (``ok`` defaults to true); an EdgeAgentError it raises becomes
    ``{"ok": false, "error": message}``. Handlers run on the connection's own thread, so a
    slow one (an OTA install) never stalls the frame loop.
    """

    def __init__(self, sock_path: Path, handlers: Mapping[str, Handler] | None = None) -> None:
        self.sock_path = sock_path
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def register(self, name: str, handler: Handler) -> None:
        """Add or replace the handler for command ``name`` (works while serving)."""
        with self._lock:
            self._handlers[name] = handler

    def commands(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    def start(self) -> None:
        path = self.sock_path
        if len(str(path).encode()) > 100:
            raise StateError(f"{path}: control socket path is too long for a Unix socket")
        path.parent.mkdir(parents=True, exist_ok=True)
        # a socket left by a killed daemon: remove it only if nobody answers on it
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(0.5)
            try:
                probe.connect(str(path))
                raise StateError(f"{path}: another daemon is serving this control socket")
            except (TimeoutError, ConnectionRefusedError, FileNotFoundError, OSError) as exc:
                if isinstance(exc, StateError):
                    raise
                path.unlink(missing_ok=True)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise StateError(f"{path}: cannot create the control socket ({exc.strerror})") from None
        # only the agent's user (and root) may control it
        os.chmod(path, 0o660)
        sock.listen(8)
        # accept() blocks with no timeout (no idle wakeups); stop() wakes it by shutdown()
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_forever, name="control", daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30.0)
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                try:
                    line = reader.readline(MAX_REQUEST_BYTES + 1)
                except (TimeoutError, OSError):
                    return
                if not line:
                    return
                reply = self.dispatch(line)
                try:
                    conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                except OSError:
                    return

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Answer one request line (public so tests and the daemon can call it directly)."""
        if len(line) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": "request too large"}
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not a JSON object"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request needs "cmd": "<command>"'}
        name = request["cmd"]
        with self._lock:
            handler = self._handlers.get(name)
        if handler is None:
            return {
                "ok": False,
                "error": f"unknown command {name!r} (known: {', '.join(self.commands())})",
            }
        try:
            reply = dict(handler(request))
        except EdgeAgentError as exc:
            return {"ok": False, "error": str(exc), "exit_code": exc.exit_code}
        except Exception as exc:
            log.exception("control: %s failed", name)
            return {"ok": False, "error": f"{name} failed: {type(exc).__name__}: {exc}"}
        reply.setdefault("ok", True)
        return reply

    def stop(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is None:
            # never bound (or already stopped): the socket file may be another daemon's
            return
        # shutdown() wakes the thread blocked in accept() (close() alone does not on Linux)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        self._sock = None
        if self._thread is not None:
            self._thread.join(2.0)
        self.sock_path.unlink(missing_ok=True)


def control_request(
    sock_path: Path, request: Mapping[str, Any], timeout_s: float = 10.0
) -> dict[str, Any]:
    """Send one request to a running daemon and return its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(sock_path))
        except FileNotFoundError:
            raise UsageError(f"{sock_path}: no control socket (is the daemon running?)") from None
        except OSError as exc:
            raise UsageError(f"{sock_path}: cannot connect ({exc.strerror or exc})") from None
        sock.sendall(json.dumps(dict(request)).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise StateError(f"{sock_path}: no reply within {timeout_s:g} s") from None
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise StateError(f"{sock_path}: the daemon sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise StateError(f"{sock_path}: the daemon sent a reply that is not a JSON object")
    return reply
