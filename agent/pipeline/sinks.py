"""Result sinks (JSONL with rotation, stdout, HTTP, MQTT) behind bounded drop-oldest queues."""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from agent.config import SinkConfig
from agent.errors import ConfigError
from agent.telemetry import jsonsafe
from agent.telemetry.ratelimit import warn_every

log = logging.getLogger(__name__)

# a failing sink logs at most one warning per this many seconds
WARN_EVERY_S = 30.0


class Sink:
    """A bounded queue in front of a writer thread: put() never blocks the frame loop.

    When the queue is full the oldest item is dropped and counted: for live inference the
    newest result is worth more than a backlog. Subclasses implement ``write_one``.
    """

    kind = "sink"
    #: > 0: after the first queued result the writer waits this long for more and hands
    #: them to ``write_batch`` together (one write and flush instead of one per result).
    batch_wait_s = 0.0
    #: a batch this long is written without waiting out ``batch_wait_s``
    batch_max = 256

    def __init__(self, name: str, queue_size: int = 1000) -> None:
        self.name = name
        self._queue: deque[Mapping[str, Any]] = deque()
        self._max = max(1, queue_size)
        # put() takes the plain lock, not the Condition: Condition's `with` is two
        # Python-level calls, and put() runs on the frame loop for every result
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closing = False
        self._in_flight = 0
        self._gathering = False
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(
            target=self._drain_forever, name=f"sink-{name}", daemon=True
        )
        self._thread.start()

    def put(self, item: Mapping[str, Any]) -> None:
        with self._lock:
            if self._closing:
                return
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            # Wake the writer only when it may be waiting for a first result (or a batch is
            # full): a writer that is busy or gathering a batch finds this one anyway, and a
            # wake-up per frame costs the frame loop a thread switch.
            queued = len(self._queue)
            if (queued == 1 and not self._gathering) or queued == self.batch_max:
                self._cond.notify()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + self._in_flight

    def _take(self) -> list[Mapping[str, Any]] | None:
        """The next results to write (None: closing and nothing left); holds the lock."""
        if self.batch_wait_s > 0 and not self._closing:
            # After each write, gather for one window; a put meanwhile wakes nobody, so a
            # steady stream costs one wake-up per window, not one per result.
            self._gathering = True
            deadline = time.monotonic() + self.batch_wait_s
            while not self._closing and len(self._queue) < self.batch_max:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._gathering = False
        # nothing gathered: block until a first result (an idle sink costs nothing)
        while not self._queue and not self._closing:
            self._cond.wait()
        if not self._queue:
            return None
        if self.batch_wait_s <= 0:
            return [self._queue.popleft()]
        items = list(self._queue)
        self._queue.clear()
        return items

    def _drain_forever(self) -> None:
        while True:
            with self._cond:
                items = self._take()
                if items is None:
                    return
                self._in_flight = len(items)
            try:
                if self.batch_wait_s > 0:
                    self.write_batch(items)
                else:
                    self.write_one(items[0])
                self.written += len(items)
            except Exception as exc:  # a sink fault must not kill its thread
                self.failed += len(items)
                self.last_error = str(exc)
                warn_every(
                    log,
                    f"sink:{self.name}",
                    WARN_EVERY_S,
                    "sink %s: write failed (%s); %d failed so far",
                    self.name,
                    exc,
                    self.failed,
                )
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def write_batch(self, items: list[Mapping[str, Any]]) -> None:
        """Write several results (sinks with ``batch_wait_s``); default: one by one."""
        for item in items:
            self.write_one(item)

    def write_one(self, item: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self, timeout_s: float = 5.0) -> bool:
        """Write what is queued for up to ``timeout_s``, then stop. True if all was written."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        drained = not self._thread.is_alive()
        if not drained:
            with self._cond:
                left = len(self._queue)
                self.dropped += left
                self._queue.clear()
            log.warning(
                "sink %s: gave up draining after %.1f s (%d results dropped)",
                self.name,
                timeout_s,
                left,
            )
        self.release()
        return drained

    def release(self) -> None:
        """Free the sink's resources (files, connections)."""

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": self.pending(),
            "last_error": self.last_error,
        }


def _line(item: Mapping[str, Any]) -> str:
    # NaN/Inf (a model can output them) become null: strict JSON readers refuse NaN
    return jsonsafe.dumps(item, separators=(",", ":"), sort_keys=False) + "\n"


def _trim_torn_tail(fd: int, size: int) -> int:
    """Cut a last line without its newline (a crash mid-write); returns the new size."""
    start = size
    while start > 0:
        step = min(start, 64 << 10)
        chunk = os.pread(fd, step, start - step)
        if start == size and chunk.endswith(b"\n"):
            return size
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            keep = start - step + newline + 1
            os.ftruncate(fd, keep)
            return keep
        start -= step
    if size:
        os.ftruncate(fd, 0)
    return 0


class StdoutSink(Sink):
    """One JSON line per result on stdout (journald keeps it under systemd)."""

    kind = "stdout"

    def __init__(self, queue_size: int = 1000, stream: TextIO | None = None) -> None:
        self._stream = stream
        super().__init__("stdout", queue_size)

    def write_one(self, item: Mapping[str, Any]) -> None:
        stream = self._stream or sys.stdout
        stream.write(_line(item))
        stream.flush()


class JsonlSink(Sink):
    """JSON lines in a file, rotated at ``max_bytes``, keeping ``backups`` old files (.1, .2).

    The file only ever holds whole lines: a batch is one write, and a write that fails
    part-way (ENOSPC, EIO) is truncated back to the last whole line before the error is
    counted, so the next batch, once there is room again, starts on a line of its own.
    """

    kind = "jsonl"

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        queue_size: int = 1000,
        flush_interval_s: float = 1.0,
    ) -> None:
        # Results reach the file within flush_interval_s, in one write per batch: one
        # wake-up of this thread per interval however high the frame rate (0: each
        # result is written as it comes, one wake-up per result).
        self.batch_wait_s = flush_interval_s
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise ConfigError(f"sink {path}: cannot open for writing ({exc.strerror})") from None
        self.rotations = 0
        self.truncations = 0
        super().__init__(f"jsonl:{path.name}", queue_size)

    def _open(self) -> None:
        # O_APPEND: after a truncation the next write lands at the new end, not past it
        # (read too: the tail is checked for a torn line)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # a torn last line left by a crash or power cut would glue onto ours
            self._size = _trim_torn_tail(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for i in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if newer.exists():
                if i == self.backups:
                    older.unlink(missing_ok=True)
                os.replace(newer, older)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._open()
        self.rotations += 1

    def write_one(self, item: Mapping[str, Any]) -> None:
        self.write_batch([item])

    def write_batch(self, items: list[Mapping[str, Any]]) -> None:
        # One write per batch, rotating between lines: a reader (or a power cut) sees
        # whole lines, never a buffer cut mid-line.
        chunk: list[bytes] = []
        chunk_bytes = 0
        for item in items:
            data = _line(item).encode("utf-8")
            if self._size + chunk_bytes and self._size + chunk_bytes + len(data) > self.max_bytes:
                self._write_chunk(b"".join(chunk))
                chunk, chunk_bytes = [], 0
                self._rotate()
            chunk.append(data)
            chunk_bytes += len(data)
        self._write_chunk(b"".join(chunk))

    def _write_chunk(self, data: bytes) -> None:
        if not data:
            return
        if self._fd is None:
            self._open()  # the last rotation failed to reopen; try again
        assert self._fd is not None
        fd, good_size = self._fd, self._size
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                if n <= 0:  # pragma: no cover - a regular file writes or raises
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        except OSError:
            # part of the batch may be in the file: cut it back to the last whole line
            # (freeing blocks, so a truncate succeeds even on a full disk)
            try:
                os.ftruncate(fd, good_size)
                self.truncations += 1
            except OSError as trunc_exc:
                # reopening trims the torn tail (_open), so the next batch tries that
                log.error("sink %s: cannot truncate a torn line (%s)", self.name, trunc_exc)
                os.close(fd)
                self._fd = None
            raise
        self._size = good_size + len(data)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class HttpSink(Sink):
    """POSTs each result as JSON to a webhook, with a timeout; failures are counted, not raised."""

    kind = "http"

    def __init__(
        self, url: str, timeout_s: float, headers: Mapping[str, str], queue_size: int = 1000
    ) -> None:
        import requests

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"sink url {url!r}: expected http:// or https://")
        self.url = url
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers.update({"Content-Type": "application/json", **dict(headers)})
        super().__init__(f"http:{parts.netloc}", queue_size)

    def write_one(self, item: Mapping[str, Any]) -> None:
        resp = self._session.post(self.url, data=_line(item), timeout=self.timeout_s)
        if resp.status_code >= 300:
            raise OSError(f"HTTP {resp.status_code} from {self.url}")

    def release(self) -> None:
        self._session.close()


class MqttSink(Sink):
    """Publishes each result to an MQTT topic (paho-mqtt, extra ``mqtt``)."""

    kind = "mqtt"

    def __init__(
        self, url: str, topic: str, qos: int, timeout_s: float, queue_size: int = 1000
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError(
                "sink mqtt: needs paho-mqtt (pip install 'edge-agent[mqtt]')"
            ) from None
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ConfigError(f"sink url {url!r}: expected mqtt://host:port")
        self.topic = topic
        self.qos = qos
        self.timeout_s = timeout_s
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]  # paho re-exports it untyped
        # connect in the background and keep reconnecting: a broker that is down at start
        # must not stop the agent
        self._client.connect_async(parts.hostname, parts.port or 1883)
        self._client.loop_start()
        super().__init__(f"mqtt:{parts.hostname}", queue_size)

    def write_one(self, item: Mapping[str, Any]) -> None:
        if not self._client.is_connected():
            raise OSError("not connected to the MQTT broker")
        info = self._client.publish(self.topic, _line(item).strip(), qos=self.qos)
        if self.qos > 0:
            info.wait_for_publish(self.timeout_s)

    def release(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def open_sink(config: SinkConfig) -> Sink:
    """Build one configured sink."""
    if config.kind == "stdout":
        return StdoutSink(config.queue_size)
    if config.kind == "jsonl":
        if config.path is None:
            raise ConfigError("sinks: a jsonl sink needs a path")
        return JsonlSink(
            config.path,
            config.max_bytes,
            config.backups,
            config.queue_size,
            config.flush_interval_s,
        )
    if config.kind == "http":
        return HttpSink(config.url or "", config.timeout_s, config.headers, config.queue_size)
    return MqttSink(
        config.url or "",
        config.topic or "edge-agent/results",
        config.qos,
        config.timeout_s,
        config.queue_size,
    )
