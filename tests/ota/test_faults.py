"""OTA faults on real parts: an HTTP proxy, a server ignoring Range, a full disk, a model
whose load kills the process on every start."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.config import AgentConfig
from agent.errors import StateError
from agent.ota import install
from agent.ota.download import TargetRef, download_target
from agent.ota.fetch import FetchLimits, HttpFetcher
from agent.ota.killpoint import KILL_AT_ENV
from agent.ota.states import OTAState

from .conftest import (
    DEMO,
    Device,
    feed_frames,
    make_device,
    publish_release,
    release_floor,
    repo_device,
)

# ------------------------------------------------------------------ a forward HTTP proxy


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A CONNECT-less forward proxy: takes absolute-URI GETs, sends them to 127.0.0.1."""

    seen: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        if not url.scheme or not url.port:  # an origin-form request: not sent via a proxy
            self.send_error(400, "proxy expects an absolute URI")
            return
        # Whatever host the client named, the only upstream is this machine.
        upstream = http.client.HTTPConnection("127.0.0.1", url.port, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() == "range"}
        upstream.request("GET", url.path + (f"?{url.query}" if url.query else ""), None, headers)
        resp = upstream.getresponse()
        body = resp.read()
        self.send_response(resp.status)
        for key in ("Content-Range", "Content-Type"):
            if resp.getheader(key):
                self.send_header(key, str(resp.getheader(key)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        upstream.close()


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """(proxy URL, the request targets it forwarded) for a proxy on 127.0.0.1."""
    seen: list[str] = []
    handler = type("P", (_ProxyHandler,), {"seen": seen})
    server = _ThreadingServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_update_goes_through_the_configured_proxy(
    tmp_path: Path, http_dir: Any, proxy: tuple[str, list[str]]
) -> None:
    url, www, faults = http_dir
    proxy_url, seen = proxy
    port = urllib.parse.urlsplit(url).port
    # A host name that does not resolve: only a request sent through the proxy arrives.
    dev = repo_device(tmp_path, f"http://ota.device-test.invalid:{port}", www)
    dev.config = AgentConfig(
        device_id=dev.config.device_id,
        state_dir=dev.state_dir,
        ota=dev.config.ota.__class__(**{**dev.config.ota.__dict__, "proxy_url": proxy_url}),
    )
    publish_release(dev, www, "1.0.0", 1)
    svc = dev.service()
    result = svc.update_now()
    assert result.take and svc.journal.state() is OTAState.PROBATION
    assert install.read_links(dev.state_dir).current == "digits-1.0.0"
    paths = [urllib.parse.urlsplit(p).path for p in seen]
    assert all(p.startswith("http://ota.device-test.invalid:") for p in seen), seen
    assert "/metadata/timestamp.json" in paths
    assert any(p.startswith("/targets/packages/") for p in paths)
    assert len(faults["requests"]) == len(seen)  # the server saw nothing else


# ------------------------------------------------------------------ Range ignored after a cut


def test_server_ignoring_range_after_a_cut_restarts_the_file(tmp_path: Path, http_dir: Any) -> None:
    url, www, faults = http_dir
    body = np.random.default_rng(1).bytes(300_000)
    (www / "targets" / "packages").mkdir(parents=True)
    (www / "targets" / "packages" / "x.tar").write_bytes(body)
    faults.update(targets="cut", cuts=1, ignore_range=True)
    ref = TargetRef(
        f"{url}/targets/packages/x.tar", len(body), hashlib.sha256(body).hexdigest(), "x.tar"
    )
    path = download_target(HttpFetcher(FetchLimits()), ref, tmp_path / "staging")
    assert path.read_bytes() == body
    assert not list((tmp_path / "staging").glob("*.part"))
    ranges = [r for _, r in faults["requests"]]
    # The resume asked for the rest; the server sent all of it with 200 instead.
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] == f"bytes={len(body) // 3}-"


# ------------------------------------------------------------------ a real full disk


def _padded_model(pad_bytes: int) -> bytes:
    """The demo digits model plus an unused initializer: same outputs, ``pad_bytes`` bigger."""
    model = onnx.load(str(DEMO / "digits_fp32.onnx"))
    pad = np.random.default_rng(2).standard_normal(pad_bytes // 4).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "unused_padding"))
    return model.SerializeToString()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (needs root and mount rights, else skipped)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_during_extraction_keeps_the_old_model(tmp_path: Path, small_disk: Path) -> None:
    dev = make_device(tmp_path / "dev")
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    feed_frames(svc, 20)
    svc.close()
    # Move the provisioned state dir onto the small filesystem.
    shutil.copytree(dev.state_dir, small_disk / "state", symlinks=True)
    small = Device(
        dev.root,
        small_disk / "state",
        dev.keys,
        AgentConfig(
            device_id=dev.config.device_id, state_dir=small_disk / "state", ota=dev.config.ota
        ),
        dev.packages,
    )
    big = small.package("1.1.0", 2, _padded_model(600_000))
    # Leave room for the journal but not for the 600 kB model.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 200_000))
    svc = small.service()
    with pytest.raises(StateError, match="No space left on device"):
        svc.install_file(big)
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.IDLE
    assert "No space left on device" in last.reason
    assert install.read_links(small.state_dir) == install.Links("digits-1.0.0", None)
    assert not (small.state_dir / "models" / "digits-1.1.0").exists()
    assert not any((small.state_dir / "staging").iterdir())
    assert svc.journal.refusal("digits", "1.1.0", "local") is None  # a retry may succeed
    # Space freed: the same package installs and commits.
    (small_disk / "filler").unlink()
    assert svc.install_file(big).state is OTAState.PROBATION
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


# ------------------------------------------------------------------ a model that kills its loader

# One agent start: journal recovery first, then load and warm the current model, as the
# daemon's start must do it.
START_AGENT = """
import json, sys
from pathlib import Path
from agent.config import AgentConfig, OTAConfig
from agent.ota import install
from agent.ota.service import load_package_backend, recover_at_start
cfg = AgentConfig(device_id="test-device-1", state_dir=Path(sys.argv[1]),
                  ota=OTAConfig(crash_loop_limit=int(sys.argv[2])))
print(recover_at_start(cfg), flush=True)
pkg = install.resolve(cfg.state_dir, "current")
manifest = json.loads((pkg / "manifest.json").read_bytes())
backend = load_package_backend(pkg, manifest)
backend.warmup(1)
print("running", manifest["version"], flush=True)
"""


def test_model_crashing_the_process_on_load_is_rolled_back_by_the_breaker(
    device: Device,
) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    svc.close()  # on probation; now the agent restarts, and loading 1.1.0 kills it
    limit = device.config.ota.crash_loop_limit
    env = {**os.environ, KILL_AT_ENV: "model.load:digits-1.1.0"}
    runs = []
    for _ in range(limit + 1):
        done = subprocess.run(
            [sys.executable, "-c", START_AGENT, str(device.state_dir), str(limit)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        runs.append((done.returncode, done.stdout.strip().splitlines()))
    killed = [(-9, ["probation continues"])] * (limit - 1)
    assert runs[: limit - 1] == killed, runs
    assert runs[limit - 1] == (0, ["rolled back (crash loop)", "running 1.0.0"]), runs
    assert runs[limit] == (0, ["nothing in flight", "running 1.0.0"]), runs
    svc = device.service()
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.ROLLED_BACK
    assert f"crash loop: {limit} restarts" in last.reason
    assert install.read_links(device.state_dir) == install.Links("digits-1.0.0", "digits-1.1.0")
    assert "crash loop" in (svc.journal.refusal("digits", "1.1.0", "local") or "")
    assert release_floor(device) == 1
    history = [json.dumps(e.to_dict()) for e in svc.journal.history()]
    assert sum('"restart ' in h for h in history) == limit - 1
