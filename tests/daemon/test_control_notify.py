"""The control socket (real Unix socket, JSON lines) and sd_notify (real datagram socket)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from agent.control import ControlServer, control_request
from agent.errors import ModelError, StateError, UsageError
from agent.sdnotify import Notifier


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = ControlServer(tmp_path / "c.sock", {"echo": lambda req: {"got": req.get("x")}})
    srv.start()
    yield srv
    srv.stop()


def test_request_reply_and_registration_while_serving(server: ControlServer) -> None:
    assert control_request(server.sock_path, {"cmd": "echo", "x": 5}) == {"got": 5, "ok": True}
    server.register("install", lambda req: {"installed": req["path"]})
    reply = control_request(server.sock_path, {"cmd": "install", "path": "/p.tar"})
    assert reply == {"installed": "/p.tar", "ok": True}


def test_errors_are_replies_not_crashes(server: ControlServer) -> None:
    def refuse(_req: dict[str, Any]) -> dict[str, Any]:
        raise ModelError("m.onnx: model file not found")

    def boom(_req: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("bug")

    server.register("refuse", refuse)
    server.register("boom", boom)
    assert control_request(server.sock_path, {"cmd": "nope"})["ok"] is False
    r = control_request(server.sock_path, {"cmd": "refuse"})
    assert r == {"ok": False, "error": "m.onnx: model file not found", "exit_code": 2}
    assert "ValueError" in control_request(server.sock_path, {"cmd": "boom"})["error"]
    assert server.dispatch(b"[1, 2]\n")["ok"] is False
    assert server.dispatch(b"{not json\n")["error"] == "request is not a JSON object"
    # the server still answers after all that
    assert control_request(server.sock_path, {"cmd": "echo"})["ok"] is True


def test_several_requests_on_one_connection(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.sock_path))
        s.sendall(b'{"cmd": "echo", "x": 1}\n{"cmd": "echo", "x": 2}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += s.recv(4096)
    assert data.splitlines() == [b'{"got": 1, "ok": true}', b'{"got": 2, "ok": true}']


def test_a_second_server_on_a_live_socket_is_refused(server: ControlServer) -> None:
    with pytest.raises(StateError, match="another daemon"):
        ControlServer(server.sock_path).start()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a killed daemon's leftover
    srv = ControlServer(path, {"echo": lambda r: {}})
    srv.start()
    try:
        assert control_request(path, {"cmd": "echo"})["ok"] is True
    finally:
        srv.stop()
    assert not path.exists()


def test_no_daemon_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is the daemon running"):
        control_request(tmp_path / "none.sock", {"cmd": "status"})


def test_notifier_sends_datagrams(tmp_path: Path, helpers: Any) -> None:
    listener = helpers.NotifyListener(tmp_path / "n.sock")
    try:
        n = Notifier({"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_s == 3.0
        assert n.ready("loading done") and n.watchdog() and n.stopping()
        n.close()
        assert listener.drain() == ["READY=1\nSTATUS=loading done", "WATCHDOG=1", "STOPPING=1"]
    finally:
        listener.close()


def test_notifier_abstract_socket_and_no_systemd(tmp_path: Path) -> None:
    name = f"edge-agent-test-{id(tmp_path)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert s.recv(100) == b"STATUS=hi"
    finally:
        s.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_s is None
    # WATCHDOG_PID for another process: the watchdog is not ours to feed
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
