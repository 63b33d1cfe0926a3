"""Sinks: JSONL rotation, a real webhook on 127.0.0.1, and backpressure that never blocks."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.config import SinkConfig
from agent.errors import ConfigError
from agent.pipeline.sinks import HttpSink, JsonlSink, StdoutSink, open_sink


class Webhook:
    """A real HTTP server collecting POSTed JSON; can be made slow or failing."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status = 200
        self.release = threading.Event()
        self.release.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.release.wait(10)
                time.sleep(hook.delay_s)
                hook.received.append(json.loads(body))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def test_jsonl_rotates_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path, max_bytes=2048, backups=2, queue_size=10_000)
    for i in range(300):
        sink.put({"seq": i, "pad": "x" * 40})
    assert sink.close(10.0)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 2048
        for line in p.read_text().splitlines():
            json.loads(line)  # whole lines only
    # the newest lines are in the live file, older ones in .1; the oldest were rotated out
    last = [json.loads(x)["seq"] for x in path.read_text().splitlines()]
    assert last[-1] == 299
    older = [json.loads(x)["seq"] for x in (tmp_path / "r.jsonl.1").read_text().splitlines()]
    assert older[-1] == last[0] - 1
    assert sink.rotations >= 3


def test_jsonl_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open"):
        JsonlSink(blocker / "r.jsonl", 4096, 1)


def test_stdout_sink_writes_json_lines() -> None:
    buf = io.StringIO()
    sink = StdoutSink(stream=buf)
    sink.put({"a": 1})
    sink.put({"a": 2})
    assert sink.close(5.0)
    assert [json.loads(x) for x in buf.getvalue().splitlines()] == [{"a": 1}, {"a": 2}]


def test_http_sink_posts_with_headers(webhook: Webhook) -> None:
    sink = HttpSink(webhook.url, 2.0, {"X-Device": "d1"})
    for i in range(5):
        sink.put({"seq": i})
    assert sink.close(5.0)
    assert [r["seq"] for r in webhook.received] == [0, 1, 2, 3, 4]
    assert sink.written == 5 and sink.failed == 0


def test_slow_webhook_never_blocks_put_and_drops_oldest(webhook: Webhook) -> None:
    webhook.release.clear()  # the server hangs every request until released
    sink = HttpSink(webhook.url, 5.0, {}, queue_size=10)
    started = time.monotonic()
    for i in range(1000):
        sink.put({"seq": i})
    put_s = time.monotonic() - started
    assert put_s < 2.0  # generous: the point is it does not wait 5 s per request
    assert sink.dropped >= 1000 - 10 - 1
    webhook.release.set()
    assert sink.close(10.0)
    seqs = [r["seq"] for r in webhook.received]
    # what survived is the newest: the last 10 puts (plus the one in flight)
    assert seqs[-10:] == list(range(990, 1000))
    assert sink.dropped + len(seqs) == 1000


def test_down_webhook_counts_failures_and_keeps_going(tmp_path: Path) -> None:
    sink = HttpSink("http://127.0.0.1:9/nothing", 0.5, {}, queue_size=5)
    for i in range(3):
        sink.put({"seq": i})
    assert sink.close(10.0)
    assert sink.failed == 3 and sink.written == 0


def test_http_error_status_is_a_failure(webhook: Webhook) -> None:
    webhook.status = 500
    sink = HttpSink(webhook.url, 2.0, {})
    sink.put({"seq": 1})
    sink.close(5.0)
    assert sink.failed == 1


def test_close_gives_up_after_its_bound(webhook: Webhook) -> None:
    webhook.release.clear()
    sink = HttpSink(webhook.url, 30.0, {}, queue_size=100)
    for i in range(20):
        sink.put({"seq": i})
    started = time.monotonic()
    assert not sink.close(0.5)
    assert time.monotonic() - started < 5.0
    assert sink.dropped >= 19


def test_open_sink_refuses_bad_urls() -> None:
    with pytest.raises(ConfigError, match="http"):
        open_sink(SinkConfig(kind="http", url="ftp://x"))


def test_mqtt_sink_publishes_to_a_real_broker(tmp_path: Path, helpers: Any) -> None:
    pytest.importorskip("paho.mqtt.client")
    broker = helpers.which("mosquitto")
    if broker is None:
        pytest.skip("no mosquitto broker installed to test against")
    import socket
    import subprocess

    import paho.mqtt.client as mqtt

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen(
        [broker, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        got: list[bytes] = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = lambda _c, _u, msg: got.append(msg.payload)

        def broker_up() -> bool:
            try:
                return sub.connect("127.0.0.1", port) == 0
            except OSError:
                return False

        helpers.wait_for(broker_up, 10, "the broker to listen")
        sub.subscribe("edge/results", qos=1)
        sub.loop_start()
        sink = open_sink(
            SinkConfig(kind="mqtt", url=f"mqtt://127.0.0.1:{port}", topic="edge/results", qos=1)
        )
        helpers.wait_for(lambda: sink._client.is_connected(), 10, "sink connected")
        time.sleep(0.3)  # let the subscription settle at the broker
        sink.put({"seq": 7})
        assert sink.close(5.0)
        helpers.wait_for(lambda: got, 10, "message")
        assert json.loads(got[0]) == {"seq": 7}
        sub.loop_stop()
    finally:
        proc.kill()
        proc.wait()


class CountingJsonl(JsonlSink):
    """A JSONL sink that counts its file writes (one per batch)."""

    writes = 0

    def _write_chunk(self, lines: list[str]) -> None:
        if lines:
            self.writes += 1
        super()._write_chunk(lines)


@pytest.mark.parametrize("flush_interval_s", [0.0, 0.25])
def test_jsonl_flush_interval_batches_a_steady_stream(
    tmp_path: Path, flush_interval_s: float
) -> None:
    # 60 results over ~0.6 s: gathered into a few writes with an interval, one write
    # each without; either way every line lands, in order
    path = tmp_path / "r.jsonl"
    sink = CountingJsonl(path, 1 << 20, 1, flush_interval_s=flush_interval_s)
    for seq in range(60):
        sink.put({"seq": seq})
        time.sleep(0.01)
    assert sink.close(5.0)
    seqs = [json.loads(line)["seq"] for line in path.read_text().splitlines()]
    assert seqs == list(range(60))
    if flush_interval_s == 0:
        assert sink.writes == 60
    else:
        # about 0.6 s / 0.25 s windows (+ the first result, written at once, and the rest
        # at close); far fewer than one per result
        assert 2 <= sink.writes <= 8


def test_sink_config_checks_flush_interval() -> None:
    assert SinkConfig(kind="jsonl", path=Path("x"), flush_interval_s=-1).check()
    assert SinkConfig(kind="jsonl", path=Path("x"), flush_interval_s=61).check()
    assert SinkConfig(kind="jsonl", path=Path("x"), flush_interval_s=0).check() is None
    sink = open_sink(SinkConfig(kind="jsonl", path=Path("/dev/null"), flush_interval_s=0.5))
    assert sink.batch_wait_s == 0.5
    sink.close(1.0)
