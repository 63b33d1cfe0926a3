"""The attack table: one row per attack on a provisioned device following a served TUF repo.

Each row names what the attacker holds (no key, a mirror or the network, the online rollout
key, the online snapshot+timestamp keys, or the offline release threshold for the rows that
show what only the offline keys may do), what they do, and the outcome the device must end
with. ``play(row, workdir)`` builds a fresh world for the row: operator keys, a real TUF
repository on disk (agent.fleet.repo) served over HTTP on 127.0.0.1, a provisioned device
(agent.ota.service.OTAService with an injected wall clock) and the shipped digits models.
It returns what was observed; tests/security/test_attacks.py and
benchmarks/bench_attacks.py compare that with the row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import importlib.util
import json
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError
from agent.fleet import repo as fleet_repo
from agent.fleet.repo import RepoExpiry, init_repo, publish_package, refresh_repo, write_channel
from agent.ota import install
from agent.ota.channel import LKG_MARK
from agent.ota.service import CheckResult, OTAService
from agent.ota.states import OTAState
from agent.package import load_signing_key
from agent.package.revert import sign_revert_file

YEAR_S = 365.25 * 86400
DAY_S = 86400.0


def _load_ota_helpers() -> Any:
    """tests/ota/conftest.py (keys, signed packages, a provisioned state dir) as a module."""
    name = "security_ota_helpers"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "ota" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


H = _load_ota_helpers()


# ------------------------------------------------------------------ a mirror that can lie


@dataclasses.dataclass
class Mirror:
    """What the network between repository and device does to the bytes it carries."""

    # "flip" (wrong bytes), "truncate" (a clean but short body), "extend" (extra bytes)
    package: str | None = None
    # URL path suffix -> bytes served instead of the file (withheld / replayed metadata)
    override: dict[str, bytes] = dataclasses.field(default_factory=dict)
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)

    def package_gets(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if "/targets/packages/" in r[0] and ".tar" in r[0]]


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    mirror: Mirror

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/").split("?")[0]
        rng = self.headers.get("Range")
        self.mirror.requests.append((self.path, rng))
        data = next((v for k, v in self.mirror.override.items() if self.path.endswith(k)), None)
        if data is None:
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
        fault = self.mirror.package if "/targets/packages/" in self.path else None
        if fault == "flip":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        elif fault == "truncate":
            data = data[: len(data) // 2]
        elif fault == "extend":
            data = data + b"\0" * 4096
        start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        start = min(start, len(data))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def served(www: Path, mirror: Mirror) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``www`` through ``mirror``."""

    def handler(*args: Any, **kwargs: Any) -> _MirrorHandler:
        cls = type("Handler", (_MirrorHandler,), {"mirror": mirror})
        return cls(*args, directory=str(www), **kwargs)

    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ the world of one row


@dataclasses.dataclass
class WallClock:
    """The device's system clock: real time plus an offset the row sets (a wrong RTC)."""

    offset_s: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@dataclasses.dataclass
class World:
    """Operator keys, a served repository and one provisioned device."""

    www: Path
    url: str
    mirror: Mirror
    dev: Any  # tests/ota/conftest.py Device
    clock: WallClock
    svc: OTAService

    @property
    def keys(self) -> list[Any]:
        return list(self.dev.keys)

    def release(self, version: str, counter: int, int8: bool = False, **channel: Any) -> None:
        """Build, sign, publish ``digits`` ``version`` and point the stable channel at it."""
        model = "digits_int8.onnx" if int8 else "digits_fp32.onnx"
        tar = self.dev.package(version, counter, model, precision="int8" if int8 else "fp32")
        publish_package(self.www, tar, self.keys)
        self.channel(H.channel_doc(version, counter, **channel))

    def channel(self, doc: dict[str, Any]) -> None:
        write_channel(self.www, doc, self.keys)

    def install(self, version: str, counter: int, int8: bool = False) -> None:
        """Release ``version`` and let the device take it through probation to COMMITTED."""
        self.release(version, counter, int8)
        result = self.svc.update_now()
        assert result.take, result.reason
        H.feed_frames(self.svc, 20)
        assert self.svc.journal.state() is OTAState.COMMITTED, self.svc.journal.last()

    def mark_s(self) -> int:
        return int(self.svc.journal.mark(LKG_MARK))

    def running(self) -> str:
        return self.svc.current_version()

    def floor(self) -> int:
        return self.svc.release_floor("digits")

    def sign_revert(self, version: str, counter: int, max_floor: int) -> Path:
        """The offline release threshold signs and publishes a revert to ``version``."""
        path = self.dev.packages / f"digits-{version}.revert.json"
        for key in self.keys:
            if key.role == "release":
                private = key.pub_path.with_name(key.pub_path.name[: -len(".pub.json")] + ".key")
                sign_revert_file(
                    path, load_signing_key(private), "digits", version, counter, max_floor
                )
        fleet_repo.publish_revert(self.www, path, self.keys)
        return path


@contextlib.contextmanager
def world(workdir: Path, **ota: Any) -> Iterator[World]:
    """A fresh repository (repo init) served on 127.0.0.1 and a device provisioned with its
    root; ``ota`` overrides fields of the device's ota config."""
    mirror = Mirror()
    www = workdir / "www"
    www.mkdir(parents=True)
    with served(www, mirror) as url:
        dev = H.make_device(workdir, repository_url=url)
        if ota:
            dev.config = dataclasses.replace(
                dev.config, ota=dataclasses.replace(dev.config.ota, **ota)
            )
        init_repo(www, dev.keys)
        (dev.state_dir / "tuf").mkdir()
        (dev.state_dir / "tuf" / "root.json").write_bytes(
            (www / "metadata" / "1.root.json").read_bytes()
        )
        clock = WallClock()
        svc = OTAService(dev.config, system_clock=clock)
        try:
            yield World(www, url, mirror, dev, clock, svc)
        finally:
            svc.close()


# ------------------------------------------------------------------ rows and outcomes


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the device did: ``result`` is one of refused / healed / allowed / retried /
    clean / rolled back, or starts with "NOT" and says what went wrong."""

    result: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    attacker_holds: str
    does: str
    expect: str
    reason: str  # a substring of the device's reason
    play: Callable[[World], Outcome]

    def judge(self, outcome: Outcome) -> bool:
        return outcome.result == self.expect and self.reason in outcome.reason


def _try(step: Callable[[], CheckResult]) -> tuple[CheckResult | None, str]:
    """Run a device step; (its result or None, the reason it gave or the error it raised)."""
    try:
        result = step()
    except EdgeAgentError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return result, result.reason


def _verdict(ok: bool, result: str, reason: str, why_not: str) -> Outcome:
    return Outcome(result if ok else f"NOT {result}: {why_not}", reason)


def _no_refusal(w: World) -> bool:
    return w.svc.journal.last_refusal() is None


def _takes(w: World, version: str) -> bool:
    result, _ = _try(w.svc.check)
    return (
        result is not None
        and result.take
        and result.document is not None
        and (result.document.version == version)
    )


# --- the clock and freshness --------------------------------------------------------------


def clock_ahead(w: World) -> Outcome:
    w.release("1.0.0", 1)
    w.clock.offset_s = 10 * YEAR_S
    result, reason = _try(w.svc.check)
    mark_ok = w.mark_s() <= time.time() + DAY_S
    w.clock.offset_s = 0.0
    healed = _takes(w, "1.0.0")
    ok = result is None and mark_ok and healed
    return _verdict(
        ok, "healed", reason, f"refused={result is None} mark_ok={mark_ok} followed_again={healed}"
    )


def clock_behind(w: World) -> Outcome:
    w.release("1.0.0", 1)
    first = _takes(w, "1.0.0")
    mark = w.mark_s()
    w.clock.offset_s = -10 * YEAR_S
    result, reason = _try(w.svc.check)
    kept = w.mark_s() >= mark > 0
    w.clock.offset_s = 0.0
    healed = _takes(w, "1.0.0")
    ok = first and result is not None and result.take and kept and healed
    return _verdict(ok, "healed", reason, f"behind_took={result is not None} mark_kept={kept}")


def channel_dated_ahead(w: World) -> Outcome:
    ahead = datetime.now(timezone.utc) + timedelta(days=366)
    w.release("1.0.0", 1, updated=ahead.strftime("%Y-%m-%dT%H:%M:%SZ"))
    result, reason = _try(w.svc.check)
    mark_ok = w.mark_s() <= time.time() + 60
    w.release("1.1.0", 2, int8=True)
    healed = _takes(w, "1.1.0")
    ok = result is not None and result.take and mark_ok and healed
    return _verdict(ok, "healed", reason, f"mark_ok={mark_ok} followed_again={healed}")


def timestamp_far_ahead(w: World) -> Outcome:
    w.release("1.0.0", 1)
    # valid signatures by the stolen online keys, expiring in ten years
    repo = fleet_repo.load_repo(w.www)
    long_expiry = RepoExpiry(snapshot_days=3650, timestamp_days=3650)
    fleet_repo._write_snapshot_and_timestamp(repo, {}, w.keys, fleet_repo.utc_now(), long_expiry)
    result, reason = _try(w.svc.check)
    mark_ok = w.mark_s() <= time.time() + 60
    # the operator re-signs the genuine repository with its normal lifetimes
    repo = fleet_repo.load_repo(w.www)
    fleet_repo._write_snapshot_and_timestamp(repo, {}, w.keys, fleet_repo.utc_now(), RepoExpiry())
    healed = _takes(w, "1.0.0")
    ok = result is not None and mark_ok and healed
    return _verdict(ok, "healed", reason, f"mark_ok={mark_ok} followed_again={healed}")


def replayed_metadata(w: World) -> Outcome:
    w.release("1.0.0", 1)
    old = {p.name: p.read_bytes() for p in (w.www / "metadata").glob("*.json")}
    w.channel(H.channel_doc("1.0.0", 1, percent=50.0))
    _try(w.svc.check)
    w.mirror.override = {f"/metadata/{name}": data for name, data in old.items()}
    result, reason = _try(w.svc.check)
    w.mirror.override = {}
    ok = result is None and w.svc.journal.state() is OTAState.IDLE
    return _verdict(ok, "refused", reason, "old metadata was accepted")


def freeze(w: World) -> Outcome:
    w.release("1.0.0", 1)
    first = _takes(w, "1.0.0")
    # the mirror keeps serving this timestamp while the repository moves on two days
    w.mirror.override = {
        "/metadata/timestamp.json": (w.www / "metadata/timestamp.json").read_bytes()
    }
    w.clock.offset_s = 2 * DAY_S
    later = datetime.now(timezone.utc) + timedelta(days=2)
    refresh_repo(w.www, w.keys, now=later.replace(microsecond=0))
    result, reason = _try(w.svc.check)
    w.mirror.override = {}
    healed = _takes(w, "1.0.0")
    ok = first and result is None and healed
    return _verdict(ok, "healed", reason, f"stale_refused={result is None} followed_again={healed}")


# --- downgrades and other names -----------------------------------------------------------


def _two_releases(w: World) -> None:
    # both fp32: the gate then passes in either direction, so a revert is judged on trust
    w.install("1.0.0", 1)
    w.install("1.1.0", 2)


def revert_versions_downgrade(w: World) -> Outcome:
    _two_releases(w)
    w.channel(H.channel_doc("1.0.0", 1, revert_versions=["1.0.0"]))
    result, reason = _try(w.svc.update_now)
    ok = (result is not None and not result.take) and w.running() == "1.1.0" and w.floor() == 2
    return _verdict(ok, "refused", reason, f"device runs {w.running()}, floor {w.floor()}")


def signed_revert(w: World) -> Outcome:
    _two_releases(w)
    w.sign_revert("1.0.0", 1, max_floor=2)
    w.channel(H.channel_doc("1.0.0", 1))
    result, reason = _try(w.svc.update_now)
    if result is not None and result.take:
        H.feed_frames(w.svc, 20)
    ok = w.running() == "1.0.0" and w.svc.journal.state() is OTAState.COMMITTED
    return _verdict(ok, "allowed", reason, f"device runs {w.running()}")


def signed_revert_replayed(w: World) -> Outcome:
    tar = w.dev.package("1.0.0", 1)
    publish_package(w.www, tar, w.keys)
    w.install("1.1.0", 2)  # first install: 1.0.0 was never on this device
    w.sign_revert("1.0.0", 1, max_floor=2)
    w.install("1.2.0", 3)
    w.channel(H.channel_doc("1.0.0", 1))
    result, reason = _try(w.svc.update_now)
    ok = (result is not None and not result.take) and w.running() == "1.2.0"
    return _verdict(ok, "refused", reason, f"device runs {w.running()}")


def controller_abort(w: World) -> Outcome:
    _two_releases(w)
    gets = len(w.mirror.package_gets())
    aborted = H.channel_doc("1.1.0", 2, revert_versions=["1.1.0"])
    aborted["rollout"]["aborted"] = True
    w.channel(aborted)
    _, reason = _try(w.svc.check)  # only reports what the poll will do
    reported = w.running() == "1.1.0"
    _, reason = _try(w.svc.update_now)
    downloads = len(w.mirror.package_gets()) - gets
    ok = (
        reported
        and w.running() == "1.0.0"
        and w.svc.journal.state() is OTAState.ROLLED_BACK
        and downloads == 0
        and w.floor() == 2
    )
    return _verdict(ok, "rolled back", reason, f"runs {w.running()}, downloads {downloads}")


def _publish_other(w: World) -> dict[str, Any]:
    other = H.build_package(
        w.dev.packages,
        [k for k in w.keys if k.role == "release"],
        "0.1.0",
        1,
        (H.DEMO / "digits_fp32.onnx").read_bytes(),
        name="other",
    )
    publish_package(w.www, other, w.keys)
    doc = H.channel_doc("0.1.0", 1)
    doc["package"] = "other"
    doc["release"]["target"] = "packages/other-0.1.0.tar"
    return doc


def other_package(w: World) -> Outcome:
    w.install("1.0.0", 1)
    w.channel(_publish_other(w))
    result, reason = _try(w.svc.update_now)
    ok = (result is not None and not result.take) and w.running() == "1.0.0"
    return _verdict(ok, "refused", reason, f"device runs {w.svc.current_manifest()}")


def other_package_first_install(w: World) -> Outcome:
    w.release("1.0.0", 1)
    w.channel(_publish_other(w))
    result, reason = _try(w.svc.update_now)
    ok = (result is not None and not result.take) and w.svc.current_manifest() is None
    return _verdict(ok, "refused", reason, f"device runs {w.svc.current_manifest()}")


def same_version_other_bytes(w: World) -> Outcome:
    w.install("1.0.0", 1)
    before = (install.resolve(w.dev.state_dir) or Path("/")) / "manifest.json"
    old = before.read_bytes()
    # a re-built twin: the same name and version, other model bytes, a higher counter
    twin = w.dev.package("1.0.0", 2, "digits_int8.onnx", precision="int8")
    try:
        w.svc.install_file(twin)
        reason = "installed"
    except EdgeAgentError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    now = (install.resolve(w.dev.state_dir) or Path("/")) / "manifest.json"
    ok = now.read_bytes() == old and w.floor() == 1
    return _verdict(ok, "refused", reason, f"floor {w.floor()}, manifest changed {not ok}")


# --- the network --------------------------------------------------------------------------


def _retried(w: World, fault: str) -> Outcome:
    w.release("1.0.0", 1)
    w.mirror.package = fault
    result, reason = _try(w.svc.update_now)
    idle = w.svc.journal.state() is OTAState.IDLE and _no_refusal(w)
    w.mirror.package = None
    gets = len(w.mirror.package_gets())
    again, _ = _try(w.svc.update_now)
    retry_gets = w.mirror.package_gets()[gets:]
    taken = again is not None and again.take and w.svc.journal.state() is OTAState.PROBATION
    ok = result is None and idle and taken and bool(retry_gets)
    return _verdict(
        ok, "retried", reason, f"idle_no_refusal={idle} retried={taken} gets={retry_gets}"
    )


def hash_mismatch(w: World) -> Outcome:
    outcome = _retried(w, "flip")
    # after a wrong hash nothing is resumed: the retry starts from byte 0
    if outcome.result == "retried" and any(r for _, r in w.mirror.package_gets()[-1:]):
        return Outcome("NOT retried: resumed a bad file with Range", outcome.reason)
    return outcome


def truncated(w: World) -> Outcome:
    return _retried(w, "truncate")


def over_long(w: World) -> Outcome:
    return _retried(w, "extend")


def mix_and_match(w: World) -> Outcome:
    w.release("1.0.0", 1)
    # an unsigned tar on the mirror, and a channel (rollout key) that names it
    evil = w.dev.package("9.9.9", 99)
    dest = w.www / "targets" / "packages" / "digits-9.9.9.tar"
    dest.write_bytes(evil.read_bytes())
    repo = fleet_repo.load_repo(w.www)
    data = json.dumps(H.channel_doc("9.9.9", 99)).encode()
    path = "channels/stable.json"
    tfile = fleet_repo.TargetFile.from_data(path, data, ["sha256"])
    hashed = fleet_repo._hashed_target_path(repo.targets_dir, path, tfile.hashes["sha256"])
    hashed.write_bytes(data)
    signers = fleet_repo._delegation_signers(repo, fleet_repo.ROLLOUT_ROLE, w.keys)
    fleet_repo._add_delegated_target(
        repo,
        fleet_repo.ROLLOUT_ROLE,
        path,
        tfile,
        signers,
        w.keys,
        fleet_repo.utc_now(),
        RepoExpiry(),
    )
    result, reason = _try(w.svc.update_now)
    ok = result is None and not w.mirror.package_gets() and w.svc.current_manifest() is None
    return _verdict(ok, "refused", reason, "the unsigned target was fetched or installed")


def fresh_repository(w: World) -> Outcome:
    result, reason = _try(w.svc.check)
    clean = result is not None and not result.take and w.svc.journal.state() is OTAState.IDLE
    w.release("1.0.0", 1)
    follows = _takes(w, "1.0.0")
    return _verdict(clean and follows, "clean", reason, f"clean={clean} follows={follows}")


ATTACKS: tuple[Attack, ...] = (
    Attack(
        "clock +10 years, then right",
        "none (a wrong RTC at boot)",
        "device clock reads 10 years ahead for one check",
        "healed",
        "expired",
        clock_ahead,
    ),
    Attack(
        "clock -10 years, then right",
        "none (a Pi without RTC)",
        "device clock reads 10 years behind",
        "healed",
        "taking digits 1.0.0",
        clock_behind,
    ),
    Attack(
        "channel dated a year ahead",
        "rollout",
        "signs a channel document whose `updated` is a year ahead",
        "healed",
        "taking digits 1.0.0",
        channel_dated_ahead,
    ),
    Attack(
        "timestamp expiring in 10 years",
        "snapshot+timestamp",
        "re-signs snapshot and timestamp with 10-year expiries",
        "healed",
        "taking digits 1.0.0",
        timestamp_far_ahead,
    ),
    Attack(
        "replayed old metadata",
        "a mirror",
        "serves yesterday's validly signed metadata again",
        "refused",
        "replay",
        replayed_metadata,
    ),
    Attack(
        "freeze (timestamp withheld)",
        "a mirror",
        "keeps serving an old timestamp while the repository moves on",
        "healed",
        "expired",
        freeze,
    ),
    Attack(
        "revert_versions downgrade",
        "rollout",
        "points the channel at 1.0.0 (below the floor) listed in revert_versions",
        "refused",
        "not above the floor",
        revert_versions_downgrade,
    ),
    Attack(
        "revert signed by the release threshold",
        "release threshold (offline, operator)",
        "signs and publishes a revert to 1.0.0, channel points at it",
        "allowed",
        "signed revert",
        signed_revert,
    ),
    Attack(
        "signed revert replayed after the fleet moved on",
        "rollout",
        "points the channel at a reverted release again after 1.2.0 was committed",
        "refused",
        "covers floors up to 2",
        signed_revert_replayed,
    ),
    Attack(
        "controller abort",
        "rollout (the controller's own abort)",
        "aborts 1.1.0 with revert_versions [1.1.0]",
        "rolled back",
        "rolling back to 1.0.0",
        controller_abort,
    ),
    Attack(
        "channel moved to another package",
        "rollout",
        "points the device's channel at package 'other' (empty floor)",
        "refused",
        "carries package 'other'",
        other_package,
    ),
    Attack(
        "another package before the first install",
        "rollout",
        "points a device provisioned for digits at package 'other'",
        "refused",
        "carries package 'other'",
        other_package_first_install,
    ),
    Attack(
        "same name and version, other bytes",
        "release threshold (a re-built twin)",
        "installs digits 1.0.0 again with other model bytes and a higher counter",
        "refused",
        "same name and version, other bytes",
        same_version_other_bytes,
    ),
    Attack(
        "hash-mismatch download",
        "a mirror",
        "flips bytes of the package",
        "retried",
        "does not match the signed",
        hash_mismatch,
    ),
    Attack(
        "truncated download",
        "a mirror",
        "serves half of the package",
        "retried",
        "connection closed at",
        truncated,
    ),
    Attack(
        "over-long download",
        "a mirror",
        "appends 4 KiB to the package",
        "retried",
        "more than the signed",
        over_long,
    ),
    Attack(
        "mix-and-match: unsigned target",
        "rollout + a mirror",
        "signs a channel naming a tar the release role never signed",
        "refused",
        "which is not signed",
        mix_and_match,
    ),
    Attack(
        "fresh repository",
        "none",
        "device polls before the first publish",
        "clean",
        "not published yet",
        fresh_repository,
    ),
)

# rows that need the device provisioned for a package name before it runs any
_OTA_OVERRIDES: dict[str, dict[str, Any]] = {
    "another package before the first install": {"package": "digits"},
}


def play(attack: Attack, workdir: Path) -> Outcome:
    """Build a fresh world under ``workdir`` and play one row in it."""
    with world(workdir, **_OTA_OVERRIDES.get(attack.name, {})) as w:
        try:
            return attack.play(w)
        except (AssertionError, EdgeAgentError) as exc:
            return Outcome(f"NOT {attack.expect}: setup failed", f"{type(exc).__name__}: {exc}")
