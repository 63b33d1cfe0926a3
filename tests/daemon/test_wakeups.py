"""Idle wakeups: the control socket blocks in accept() and the frame loop sleeps on a pipe;
both still stop at once when asked, without waiting out a timeout or a frame period."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.control import ControlServer, control_request, control_socket_path
from agent.daemon import Daemon


def test_control_server_blocks_in_accept_and_stops_at_once(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock", {"ping": lambda _req: {"pong": True}})
    server.start()
    assert server._sock is not None and server._sock.gettimeout() is None
    assert control_request(tmp_path / "c.sock", {"cmd": "ping"})["pong"] is True
    thread = server._thread
    assert thread is not None
    server.stop()
    thread.join(1.0)
    assert not thread.is_alive()
    assert not (tmp_path / "c.sock").exists()


def test_sleeping_loop_wakes_on_stop_before_its_deadline(make_config: Any, helpers: Any) -> None:
    # one frame every 30 s: a stop must not wait for the next deadline
    cfg = load_config(make_config(scheduler={"fps_cap": 1 / 30}))
    daemon = Daemon(cfg)
    daemon.start()
    try:
        runner = threading.Thread(target=daemon.loop, daemon=True)
        runner.start()
        helpers.wait_for(lambda: daemon.stats.frames >= 1, what="the first frame")
        time.sleep(0.2)  # the loop is now asleep until the next deadline
        daemon.request_stop("test")
        runner.join(5.0)
        assert not runner.is_alive()
        assert daemon.stats.frames == 1
        # a second run of the loop is not cut short by the old wake-up
        daemon._stop_requested = False
        daemon.scheduler.set_cap(20)
        daemon.scheduler.restart()
        runner = threading.Thread(target=daemon.loop, daemon=True)
        runner.start()
        helpers.wait_for(lambda: daemon.stats.frames >= 5, what="frames after restart")
        daemon.request_stop("test")
        runner.join(5.0)
        assert not runner.is_alive()
    finally:
        daemon.shutdown()


def test_daemon_and_cli_find_the_same_control_socket(make_config: Any, tmp_path: Path) -> None:
    default = load_config(make_config())
    assert control_socket_path(default) == default.state_dir / "control.sock"
    custom = load_config(make_config(status={"control_socket": str(tmp_path / "x.sock")}))
    assert Daemon(custom).control.sock_path == control_socket_path(custom) == tmp_path / "x.sock"
