"""HTTP fetching with timeouts, a total deadline and a minimum throughput; the TUF fetcher."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from agent import __version__
from agent.errors import FetchError

READ_CHUNK_BYTES = 64 << 10


@dataclass(frozen=True)
class FetchLimits:
    """Limits for one HTTP transfer; defaults suit a slow cellular link."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_deadline_s: float = 900.0
    # A server dripping bytes keeps the read timeout happy; this cuts it off.
    min_bytes_per_s: float = 1024.0
    throughput_grace_s: float = 5.0
    proxy_url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class TransferCut(FetchError):
    """The transfer stopped early (connection reset, timeout, too slow); a retry may resume it."""


@dataclass
class HttpFetcher:
    """Streams URLs under FetchLimits through one requests session (honors proxies)."""

    limits: FetchLimits = field(default_factory=FetchLimits)
    clock: Callable[[], float] = time.monotonic
    # set when the agent stops: a transfer ends between two chunks (DownloadCancelled)
    stop: threading.Event | None = None

    def __post_init__(self) -> None:
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"edge-agent/{__version__}"
        self._session.headers.update(dict(self.limits.headers))
        if self.limits.proxy_url:
            self._session.proxies = {
                "http": self.limits.proxy_url,
                "https": self.limits.proxy_url,
            }

    def close(self) -> None:
        self._session.close()

    def open(self, url: str, start_byte: int = 0) -> tuple[int, Iterator[bytes]]:
        """GET ``url`` (from ``start_byte`` with a Range header); returns (status, chunks).

        Status is 200 (whole body) or 206 (the range asked for). Other statuses raise
        FetchError; network trouble raises TransferCut.
        """
        headers = {"Range": f"bytes={start_byte}-"} if start_byte > 0 else {}
        started = self.clock()
        try:
            resp = self._session.get(
                url,
                headers=headers,
                stream=True,
                timeout=(self.limits.connect_timeout_s, self.limits.read_timeout_s),
            )
        except requests.exceptions.RequestException as exc:
            raise TransferCut(f"{url}: cannot connect ({type(exc).__name__})") from None
        if resp.status_code == 416 and start_byte > 0:
            resp.close()
            raise FetchError(f"{url}: server refused the range from byte {start_byte}")
        if resp.status_code not in (200, 206):
            resp.close()
            raise HttpStatusError(url, resp.status_code)
        return resp.status_code, self._chunks(url, resp, started)

    def _chunks(self, url: str, resp: requests.Response, started: float) -> Iterator[bytes]:
        received = 0
        raw: Any = resp.raw
        try:
            while True:
                try:
                    # read1 returns what has arrived, so the limits below are checked
                    # even while a slow server trickles bytes into one big chunk.
                    chunk = raw.read1(READ_CHUNK_BYTES)
                except Exception as exc:  # urllib3/socket errors of many kinds
                    raise TransferCut(
                        f"{url}: transfer cut after {received} bytes ({type(exc).__name__})"
                    ) from None
                if not chunk:
                    return
                if self.stop is not None and self.stop.is_set():
                    raise DownloadCancelled(
                        f"{url}: cancelled after {received} bytes (the agent is stopping)"
                    )
                received += len(chunk)
                elapsed = self.clock() - started
                if elapsed > self.limits.total_deadline_s:
                    raise TransferCut(
                        f"{url}: over the {self.limits.total_deadline_s:g} s deadline "
                        f"after {received} bytes"
                    )
                if (
                    elapsed > self.limits.throughput_grace_s
                    and received / elapsed < self.limits.min_bytes_per_s
                ):
                    raise TransferCut(
                        f"{url}: too slow ({received / elapsed:.0f} B/s, minimum "
                        f"{self.limits.min_bytes_per_s:g} B/s)"
                    )
                yield chunk
        finally:
            resp.close()


class DownloadCancelled(FetchError):
    """The agent is stopping: the transfer ended on purpose (the partial file stays for a
    Range resume); not a cut, so it is not retried."""


class HttpStatusError(FetchError):
    """The server answered with an HTTP error status."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url}: HTTP {status}")
        self.status = status


class TufFetcher(FetcherInterface):
    """python-tuf's transport, backed by HttpFetcher so metadata gets the same limits."""

    def __init__(self, http: HttpFetcher) -> None:
        self.http = http

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            _, chunks = self.http.open(url)
        except HttpStatusError as exc:
            raise tuf_exceptions.DownloadHTTPError(str(exc), exc.status) from None
        except FetchError as exc:
            raise tuf_exceptions.SlowRetrievalError(str(exc)) from None
        return self._wrap(chunks)

    @staticmethod
    def _wrap(chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except FetchError as exc:
            raise tuf_exceptions.SlowRetrievalError(str(exc)) from None
