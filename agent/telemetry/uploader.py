"""Upload stored telemetry over OTLP/HTTP JSON (gzip) with backoff; delete only what was acked."""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import requests

from agent.config import TelemetryConfig
from agent.errors import ConfigError
from agent.telemetry import otlp
from agent.telemetry.store import StoredRecord, TelemetryStore

log = logging.getLogger(__name__)

# OTLP/HTTP says 429/502/503/504 are retryable; 408 and 500 are usually a proxy or a server
# restarting, and a resend is harmless because the server de-duplicates on the row keys.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

Outcome = Literal["acked", "rejected", "retry", "idle"]


@dataclass(frozen=True)
class BatchResult:
    """What happened to one batch."""

    outcome: Outcome
    rows: int = 0
    sent_bytes: int = 0
    retry_after_s: float | None = None
    detail: str = ""


@dataclass
class DrainResult:
    """Totals of one drain: rows acknowledged, batches rejected, retries, whether empty."""

    acked_rows: int = 0
    rejected_batches: int = 0
    rejected_rows: int = 0
    retries: int = 0
    sent_bytes: int = 0
    empty: bool = False
    last_error: str = ""
    details: list[str] = field(default_factory=list)


def parse_retry_after(value: str | None, now_unix_s: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc).timestamp() if now_unix_s is None else now_unix_s
    return max(0.0, when.timestamp() - now)


def backoff_delay_s(
    attempt: int, initial_s: float, max_s: float, rng: random.Random, retry_after_s: float | None
) -> float:
    """Capped exponential backoff with full jitter; never sooner than Retry-After."""
    ceiling = min(max_s, initial_s * (2.0 ** min(attempt, 30)))
    delay = rng.uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay


def check_endpoint(endpoint: str | None, where: str = "telemetry.endpoint") -> str:
    if not endpoint:
        raise ConfigError(f"{where}: no telemetry endpoint configured")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {endpoint!r}")
    return endpoint.rstrip("/")


class OtlpHttpExporter:
    """Posts one batch of stored rows to <endpoint>/v1/metrics and <endpoint>/v1/logs."""

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        request_deadline_s: float = 30.0,
        bandwidth_bytes_per_s: int = 0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.headers = dict(headers or {})
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.request_deadline_s = request_deadline_s
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self._sleep = sleep
        self._monotonic_s = monotonic_s
        self._next_send_s = 0.0
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def send(self, records: Sequence[StoredRecord]) -> BatchResult:
        if not records:
            return BatchResult("idle")
        sent = 0
        # Metrics first: if they fail, the logs (which carry every row) are not yet sent.
        metrics = otlp.metrics_request(records)
        requests_to_send: list[tuple[str, dict[str, Any]]] = []
        if metrics is not None:
            requests_to_send.append(("/v1/metrics", metrics))
        requests_to_send.append(("/v1/logs", otlp.logs_request(records)))
        for path, payload in requests_to_send:
            result = self._post(path, payload, len(records))
            sent += result.sent_bytes
            if result.outcome != "acked":
                return BatchResult(
                    result.outcome, len(records), sent, result.retry_after_s, result.detail
                )
        return BatchResult("acked", len(records), sent)

    def _throttle(self, nbytes: int) -> None:
        if self.bandwidth_bytes_per_s <= 0:
            return
        now = self._monotonic_s()
        if self._next_send_s > now:
            self._sleep(self._next_send_s - now)
            now = self._next_send_s
        self._next_send_s = now + nbytes / self.bandwidth_bytes_per_s

    def _post(self, path: str, payload: dict[str, Any], rows: int) -> BatchResult:
        raw = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        body = gzip.compress(raw, compresslevel=6)
        self._throttle(len(body))
        url = self.endpoint + path
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }
        answer = self._post_with_deadline(url, body, headers)
        if isinstance(answer, BaseException):
            return BatchResult(
                "retry", rows, len(body), None, f"{url}: {type(answer).__name__}: {answer}"
            )
        status = answer.status_code
        if 200 <= status < 300:
            self._warn_partial(url, answer)
            return BatchResult("acked", rows, len(body))
        detail = f"{url}: HTTP {status} {answer.text[:200]!r}"
        if status in RETRYABLE_STATUS:
            return BatchResult(
                "retry",
                rows,
                len(body),
                parse_retry_after(answer.headers.get("Retry-After")),
                detail,
            )
        return BatchResult("rejected", rows, len(body), None, detail)

    def _post_with_deadline(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> requests.Response | BaseException:
        # requests' read timeout is per socket read: a server sending a byte a second never
        # trips it. The request runs in a helper thread that is abandoned at the deadline.
        box: list[requests.Response | BaseException] = []
        session = self._session

        def run() -> None:
            try:
                box.append(
                    session.post(
                        url,
                        data=body,
                        headers=dict(headers),
                        timeout=(self.connect_timeout_s, self.read_timeout_s),
                    )
                )
            except Exception as exc:  # every transport failure is a retry, whatever its type
                box.append(exc)

        worker = threading.Thread(target=run, name="telemetry-post", daemon=True)
        worker.start()
        worker.join(self.request_deadline_s)
        if worker.is_alive() or not box:
            # The abandoned thread keeps the old session; give the next request a fresh one.
            self._session = requests.Session()
            return TimeoutError(f"no complete answer within {self.request_deadline_s:g} s")
        return box[0]

    @staticmethod
    def _warn_partial(url: str, answer: requests.Response) -> None:
        try:
            data = answer.json()
        except ValueError:
            return  # a 2xx is the acknowledgement; the body is optional
        partial = data.get("partialSuccess") if isinstance(data, dict) else None
        if isinstance(partial, dict) and partial:
            log.warning("telemetry upload to %s partly rejected: %s", url, partial)


def exporter_from_config(
    config: TelemetryConfig,
    endpoint: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> OtlpHttpExporter:
    return OtlpHttpExporter(
        endpoint or check_endpoint(config.endpoint),
        headers=config.headers,
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
        request_deadline_s=config.request_deadline_s,
        bandwidth_bytes_per_s=config.bandwidth_bytes_per_s,
        sleep=sleep,
    )


def drain(
    store: TelemetryStore,
    exporter: OtlpHttpExporter,
    config: TelemetryConfig,
    stop: threading.Event | None = None,
    max_s: float | None = None,
    rng: random.Random | None = None,
    max_retries: int | None = None,
    monotonic_s: Callable[[], float] = time.monotonic,
) -> DrainResult:
    """Send the backlog oldest first until it is empty, time is up or stop is set.

    Between failed attempts it waits with capped exponential backoff and full jitter
    (at least Retry-After). Rows are deleted only after both requests were acknowledged;
    a batch the server refuses (4xx) is quarantined, never resent.
    """
    stop = stop or threading.Event()
    rng = rng or random.Random()
    result = DrainResult()
    deadline = None if max_s is None else monotonic_s() + max_s
    attempt = 0
    while not stop.is_set():
        if deadline is not None and monotonic_s() >= deadline:
            break
        batch = store.backlog(config.batch_max_rows, config.batch_max_bytes)
        if not batch:
            result.empty = True
            break
        outcome = exporter.send(batch)
        result.sent_bytes += outcome.sent_bytes
        ids = [r.id for r in batch]
        if outcome.outcome == "acked":
            attempt = 0
            result.acked_rows += store.delete(ids)
            continue
        if outcome.outcome == "rejected":
            log.error(
                "telemetry batch of %d rows refused, quarantined: %s", len(ids), outcome.detail
            )
            store.quarantine_rows(ids, outcome.detail)
            result.rejected_batches += 1
            result.rejected_rows += len(ids)
            result.details.append(outcome.detail)
            continue
        result.retries += 1
        result.last_error = outcome.detail
        if attempt == 0:
            # Record it now, not only when the drain ends: during an outage the drain never
            # ends, and `status --watch` must show why nothing leaves the device.
            with contextlib.suppress(sqlite3.Error):
                store.set_meta("upload.last_error", outcome.detail[:500])
        if max_retries is not None and result.retries > max_retries:
            break
        delay = backoff_delay_s(
            attempt, config.backoff_initial_s, config.backoff_max_s, rng, outcome.retry_after_s
        )
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - monotonic_s()))
        log.info("telemetry upload failed (%s); retrying in %.2f s", outcome.detail, delay)
        attempt += 1
        stop.wait(delay)
    if result.last_error:
        with contextlib.suppress(sqlite3.Error):
            store.set_meta("upload.last_error", result.last_error[:500])
    if result.acked_rows:
        with contextlib.suppress(sqlite3.Error):
            store.set_meta("upload.last_ok_unix_ns", str(time.time_ns()))
    return result


class UploadLoop:
    """A background thread that drains the store every upload_interval_s."""

    def __init__(
        self,
        config: TelemetryConfig,
        db_path: Path,
        device_id: str,
        boot_id: str,
    ) -> None:
        self.config = config
        self.db_path = db_path
        self.device_id = device_id
        self.boot_id = boot_id
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-upload", daemon=True)
        self.last_result: DrainResult | None = None

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """Upload now instead of at the next interval."""
        self._kick.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._kick.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        exporter = exporter_from_config(self.config)
        store: TelemetryStore | None = None
        inode = None
        try:
            while not self._stop.is_set():
                try:
                    current = self.db_path.stat().st_ino if self.db_path.exists() else None
                    if store is not None and current != inode:
                        store.close()  # the writer quarantined the file and started anew
                        store = None
                    if store is None and current is not None:
                        store = TelemetryStore(
                            self.db_path,
                            self.device_id,
                            self.boot_id,
                            self.config.max_bytes,
                            self.config.synchronous,
                            check_integrity=False,
                        )
                        inode = current
                    if store is not None:
                        self.last_result = drain(store, exporter, self.config, stop=self._stop)
                except Exception as exc:  # the upload thread must outlive any one failure
                    log.warning("telemetry upload pass failed: %s", exc)
                    if store is not None:
                        store.close()
                        store = None
                self._kick.wait(self.config.upload_interval_s)
                self._kick.clear()
        finally:
            if store is not None:
                store.close()
            exporter.close()
