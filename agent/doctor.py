"""Checks a device for what edge-agent needs and says how to fix each problem it finds."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.config import AgentConfig, GovernorConfig
from agent.errors import EdgeAgentError
from agent.health.sensors import SensorReader, ThrottleFlags, total_power_w

Status = Literal["ok", "warn", "fail", "skip"]

MIN_PYTHON = (3, 10)
MIN_NUMPY = (1, 24)
# TUF metadata and signatures carry expiry dates: a clock before this year (a Pi without
# an RTC that booted without network) makes every fresh repository look expired or not
# yet valid, so updates stop.
MIN_CLOCK_YEAR = 2024
DISK_FAIL_MB = 100.0
DISK_WARN_MB = 500.0
REPO_TIMEOUT_S = 3.0
SERVICE_USER = "edge-agent"  # the .deb's and install.sh's user, when no unit names one
SERVICE_UNIT = "edge-agent.service"
# where systemd finds units, the admin's copy first (install.sh), then the package's
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
)

# (returncode, stdout) of a command, or None when it is not installed / cannot run.
RunCommand = Callable[[Sequence[str]], tuple[int, str] | None]


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _run_command(argv: Sequence[str]) -> tuple[int, str] | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *argv[1:]], capture_output=True, text=True, timeout=3.0, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.returncode, done.stdout + done.stderr


@dataclass(frozen=True)
class DoctorEnv:
    """Where the doctor looks; tests point every root at a temp dir laid out like a board."""

    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    proc_root: Path = Path("/proc")
    state_dir: Path | None = None  # None: the config's state_dir
    run_command: RunCommand = field(default=_run_command)
    now_s: Callable[[], float] = field(default=time.time)
    # None: ask the kernel (adjtimex) whether the clock is synchronized
    kernel_clock_synced: Callable[[], bool | None] | None = None
    repo_timeout_s: float = REPO_TIMEOUT_S
    # passwd and group are read from here; unit_dirs are searched for edge-agent.service
    etc_root: Path = Path("/etc")
    unit_dirs: tuple[Path, ...] = UNIT_DIRS


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# ------------------------------------------------------------------------------ software


def check_python() -> CheckResult:
    version = ".".join(str(v) for v in sys.version_info[:3])
    if sys.version_info[:2] < MIN_PYTHON:
        return CheckResult(
            "python",
            "fail",
            f"Python {version} at {sys.executable}",
            "edge-agent needs Python >= 3.10: use Raspberry Pi OS bookworm, Ubuntu 22.04+ "
            "or JetPack 6",
        )
    return CheckResult("python", "ok", f"Python {version} at {sys.executable}")


def check_numpy() -> CheckResult:
    try:
        import numpy
    except ImportError as exc:
        return CheckResult(
            "numpy", "fail", f"not importable ({exc})", "reinstall: pip install 'numpy>=1.24'"
        )
    version = str(numpy.__version__)
    if _version_tuple(version) < MIN_NUMPY:
        return CheckResult("numpy", "fail", f"numpy {version}", "pip install 'numpy>=1.24'")
    return CheckResult("numpy", "ok", f"numpy {version}")


def _load_backend_module(backend: str) -> str:
    """Import a backend's runtime for real; returns what loaded (raises ImportError)."""
    if backend == "onnx":
        ort: Any = importlib.import_module("onnxruntime")
        providers = ", ".join(ort.get_available_providers())
        return f"onnxruntime {ort.__version__} ({providers})"
    if backend == "litert":
        errors: list[str] = []
        for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
            try:
                importlib.import_module(module)
                top: Any = importlib.import_module(module.split(".")[0])
                return f"{module.split('.')[0]} {getattr(top, '__version__', '')}".strip()
            except ImportError as exc:
                errors.append(str(exc))
        raise ImportError("; ".join(errors))
    trt: Any = importlib.import_module("tensorrt")
    return f"tensorrt {trt.__version__}"


def check_backends(
    config: AgentConfig, load: Callable[[str], str] = _load_backend_module
) -> list[CheckResult]:
    """One row per backend: which ones load here, and the ORT providers."""
    rows: list[CheckResult] = []
    loaded: list[str] = []
    hints = {
        "onnx": "pip install onnxruntime (on a Jetson: JetPack's onnxruntime-gpu wheel)",
        "litert": "pip install 'edge-agent[litert]' (ai-edge-litert)",
        "tensorrt": "only on NVIDIA GPUs: comes with JetPack / the TensorRT wheels",
    }
    for backend in ("onnx", "litert", "tensorrt"):
        try:
            detail = load(backend)
        except Exception as exc:  # a broken native wheel raises more than ImportError
            wanted = config.model.backend == backend
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(
                CheckResult(
                    f"backend {backend}",
                    "fail" if wanted else "skip",
                    f"not available ({first[:120]})",
                    hints[backend] if wanted or backend != "tensorrt" else "",
                )
            )
            continue
        loaded.append(backend)
        rows.append(CheckResult(f"backend {backend}", "ok", detail))
    if not loaded:
        rows.append(
            CheckResult(
                "backends",
                "fail",
                "no inference backend loads",
                "pip install onnxruntime, or 'edge-agent[litert]' on a Raspberry Pi",
            )
        )
    return rows


# ------------------------------------------------------------------------------ hardware


def read_board_model(proc_root: Path) -> str | None:
    """The device-tree model string (Raspberry Pi and Jetson boards have one)."""
    try:
        raw = (proc_root / "device-tree" / "model").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\x00\n").decode("ascii", "replace") or None


def check_board(env: DoctorEnv) -> CheckResult:
    model = read_board_model(env.proc_root)
    return CheckResult("board", "ok", model or "no device-tree model (a PC or a VM)")


def check_camera(config: AgentConfig, env: DoctorEnv) -> CheckResult:
    try:
        nodes = sorted(env.dev_root.glob("video*"), key=lambda p: p.name)
    except OSError:
        nodes = []
    needed = config.source.kind == "camera"
    if not nodes:
        return CheckResult(
            "camera",
            "fail" if needed else "skip",
            f"no {env.dev_root}/video* device",
            "plug in the camera (RPi camera module: enable it with rpicam/libcamera and "
            "check `ls /dev/video*`)"
            if needed
            else "",
        )
    unreadable = [n.name for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
    names = ", ".join(n.name for n in nodes)
    if needed:
        wanted = env.dev_root / f"video{config.source.device}"
        if wanted not in nodes:
            return CheckResult(
                "camera",
                "fail",
                f"source.device {config.source.device}: {wanted} missing (found {names})",
                "set source.device in the config to one of the found devices",
            )
    if unreadable:
        return CheckResult(
            "camera",
            "fail" if needed else "warn",
            f"found {names}; no read/write access to {', '.join(unreadable)}",
            "add the service user to the video group: sudo adduser edge-agent video",
        )
    return CheckResult("camera", "ok", f"found {names}")


def _sensor_reader(env: DoctorEnv) -> SensorReader:
    # sysfs_root set: the reader looks only under env.sysfs_root and never asks psutil or
    # vcgencmd, so a fake tree is read exactly like the real /sys.
    return SensorReader(
        GovernorConfig(sysfs_root=env.sysfs_root, use_psutil=False, use_vcgencmd=False)
    )


def check_sensors(config: AgentConfig, env: DoctorEnv) -> CheckResult:
    reader = _sensor_reader(env)
    temps = reader.thermal_zones()
    for name, value in reader.hwmon_temps().items():
        temps.setdefault(name, value)
    rails = reader.jetson_power_w()
    if not temps:
        return CheckResult(
            "sensors",
            "warn" if config.governor.enabled else "skip",
            f"no readable temperature under {env.sysfs_root}/class/thermal or hwmon",
            "the governor only applies the FPS cap; in a container bind-mount /sys "
            "read-only, on a board check the thermal driver is loaded",
        )
    hottest = max(temps, key=lambda k: temps[k])
    detail = f"{len(temps)} temperatures, hottest {hottest} {temps[hottest]:.1f} C"
    if rails:
        watts, how = total_power_w(rails)
        detail += f"; {len(rails)} power rails, {watts:.2f} W ({how})"
    if temps[hottest] >= config.governor.soft_limit_c:
        return CheckResult(
            "sensors",
            "warn",
            detail + f" (over the soft limit {config.governor.soft_limit_c:.0f} C)",
            "improve cooling (heatsink and fan); the governor will lower the FPS cap",
        )
    return CheckResult("sensors", "ok", detail)


def _throttle_from_vcgencmd(env: DoctorEnv) -> ThrottleFlags | None:
    result = env.run_command(["vcgencmd", "get_throttled"])
    if result is None or result[0] != 0:
        return None
    try:
        return ThrottleFlags.decode(int(result[1].strip().split("=", 1)[1], 16))
    except (IndexError, ValueError):
        return None


def check_throttle(env: DoctorEnv) -> CheckResult:
    flags = _sensor_reader(env).throttle_flags() or _throttle_from_vcgencmd(env)
    if flags is None:
        return CheckResult("throttle", "skip", "no Raspberry Pi throttle flags (not a Pi)")
    detail = f"get_throttled={hex(flags.raw)}"
    if "under_voltage" in flags.now:
        return CheckResult(
            "throttle",
            "warn",
            detail + " under-voltage now",
            "use the official power supply (Pi 4: 5V 3A, Pi 5: 5V 5A) and a short cable",
        )
    if flags.now:
        return CheckResult(
            "throttle",
            "warn",
            detail + f" now: {', '.join(flags.now)}",
            "add a heatsink and fan; the governor will lower the FPS cap meanwhile",
        )
    if flags.since_boot:
        return CheckResult(
            "throttle",
            "warn",
            detail + f" since boot: {', '.join(flags.since_boot)}",
            "it happened earlier: check the power supply and cooling under load",
        )
    return CheckResult("throttle", "ok", detail + " (no throttling)")


# ------------------------------------------------------------------------------ clock


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: modes, then the fields up to `status`; the rest
    # is padding that the kernel writes into, so it is kept big.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_long * 32),
    ]


TIME_ERROR = 5  # adjtimex(): the clock is not synchronized


def kernel_clock_synced() -> bool | None:
    """adjtimex() with no change: is the kernel's clock marked synchronized (NTP)?"""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        tx = _Timex()
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


def check_clock(env: DoctorEnv) -> CheckResult:
    now = dt.datetime.fromtimestamp(env.now_s(), tz=dt.timezone.utc)
    shown = now.strftime("%Y-%m-%d %H:%M:%SZ")
    if now.year < MIN_CLOCK_YEAR:
        return CheckResult(
            "clock",
            "fail",
            f"the clock says {shown}",
            "set the time (NTP: sudo timedatectl set-ntp true; or a RTC/fake-hwclock); "
            "TUF metadata is judged against it",
        )
    result = env.run_command(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if result is not None and result[0] == 0 and result[1].strip() in ("yes", "no"):
        if result[1].strip() == "yes":
            return CheckResult("clock", "ok", f"{shown}, NTP synchronized (timedatectl)")
        return CheckResult(
            "clock",
            "warn",
            f"{shown}, NTP not synchronized (timedatectl)",
            "sudo timedatectl set-ntp true (systemd-timesyncd) or install chrony",
        )
    probe = env.kernel_clock_synced or kernel_clock_synced
    synced = probe()
    if synced is True:
        return CheckResult("clock", "ok", f"{shown}, kernel clock synchronized (adjtimex)")
    if synced is False:
        return CheckResult(
            "clock",
            "warn",
            f"{shown}, kernel clock not synchronized (adjtimex; no timedatectl)",
            "run an NTP client: `chronyc tracking` to check chrony, or install systemd-timesyncd",
        )
    return CheckResult(
        "clock", "warn", f"{shown}, sync state unknown", "check NTP: chronyc tracking"
    )


# ------------------------------------------------------------------------------ state


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(state_dir: Path) -> CheckResult:
    where = _existing_parent(state_dir)
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return CheckResult("disk", "fail", f"{where}: cannot stat ({exc.strerror})")
    free_mb = usage.free / 2**20
    detail = f"{free_mb:.0f} MB free on {where} ({100 * usage.used / usage.total:.0f}% used)"
    fix = "free space: old packages in models/, journald logs (journalctl --vacuum-size=50M)"
    if free_mb < DISK_FAIL_MB:
        return CheckResult("disk", "fail", detail, fix)
    if free_mb < DISK_WARN_MB:
        return CheckResult("disk", "warn", detail, fix)
    return CheckResult("disk", "ok", detail)


def check_state_dir(state_dir: Path) -> CheckResult:
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        return CheckResult(
            "state dir",
            "warn",
            f"{state_dir} does not exist yet",
            "systemd creates it on first start (StateDirectory=); or: "
            f"sudo install -d -o edge-agent -g edge-agent -m 0750 {state_dir}",
        )
    except OSError as exc:
        return CheckResult("state dir", "fail", f"{state_dir}: cannot stat ({exc.strerror})")
    mode = stat.S_IMODE(st.st_mode)
    detail = f"{state_dir} mode {mode:04o} uid {st.st_uid}"
    if not stat.S_ISDIR(st.st_mode):
        return CheckResult("state dir", "fail", f"{state_dir} is not a directory", "")
    if mode & 0o002:
        # the keyring and the OTA journal live here: anyone able to write could plant keys
        return CheckResult(
            "state dir", "fail", detail + " (world-writable)", f"sudo chmod 0750 {state_dir}"
        )
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return CheckResult(
            "state dir",
            "fail",
            detail + " (not writable by this user)",
            f"run as the service user (sudo -u edge-agent edge-agent doctor) or "
            f"sudo chown -R edge-agent:edge-agent {state_dir}",
        )
    return CheckResult("state dir", "ok", detail)


@dataclass(frozen=True)
class UserEntry:
    """One line of /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


@dataclass(frozen=True)
class GroupEntry:
    """One line of /etc/group."""

    name: str
    gid: int
    members: tuple[str, ...]


def _colon_rows(path: Path, fields: int) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        # "+"/"-" lines are NIS compat entries, not local accounts
        if not line.strip() or line.startswith(("#", "+", "-")):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            rows.append(parts)
    return rows


def read_passwd(path: Path) -> dict[str, UserEntry]:
    """Local accounts from a passwd file (raises OSError when it cannot be read)."""
    users: dict[str, UserEntry] = {}
    for p in _colon_rows(path, 7):
        try:
            users.setdefault(p[0], UserEntry(p[0], int(p[2]), int(p[3]), p[5], p[6]))
        except ValueError:
            continue  # a damaged line names no usable account
    return users


def read_groups(path: Path) -> dict[str, GroupEntry]:
    """Local groups from a group file (raises OSError when it cannot be read)."""
    groups: dict[str, GroupEntry] = {}
    for p in _colon_rows(path, 4):
        try:
            members = tuple(m for m in p[3].split(",") if m)
            groups.setdefault(p[0], GroupEntry(p[0], int(p[2]), members))
        except ValueError:
            continue
    return groups


@dataclass(frozen=True)
class UnitAccount:
    """Who the installed edge-agent.service runs as."""

    path: Path
    user: str | None
    supplementary_groups: tuple[str, ...]


def read_unit_account(unit_dirs: Sequence[Path]) -> UnitAccount | None:
    """User= and SupplementaryGroups= of the installed unit and its drop-ins, or None."""
    main = next((d / SERVICE_UNIT for d in unit_dirs if (d / SERVICE_UNIT).is_file()), None)
    if main is None:
        return None
    files = [main]
    for d in unit_dirs:
        files += sorted((d / f"{SERVICE_UNIT}.d").glob("*.conf"))
    user: str | None = None
    groups: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key == "User":
                user = value.strip() or None
            elif key == "SupplementaryGroups":
                # systemd: an empty assignment resets the list, others add to it
                groups = groups + value.split() if value.strip() else []
    return UnitAccount(main, user, tuple(groups))


def check_service_user(config: AgentConfig, env: DoctorEnv, state_dir: Path) -> list[CheckResult]:
    """The unit's user exists, is in the video group (camera) and owns the state dir."""
    unit = read_unit_account(env.unit_dirs)
    name = (unit.user if unit else None) or SERVICE_USER
    passwd_path, group_path = env.etc_root / "passwd", env.etc_root / "group"
    add_user = (
        f"reinstall the .deb, or: sudo adduser --system --group --home {state_dir} "
        f"--no-create-home {name}"
    )
    try:
        users = read_passwd(passwd_path)
        groups = read_groups(group_path)
    except OSError as exc:
        return [CheckResult("service user", "warn", f"cannot read {exc.filename} ({exc.strerror})")]
    user = users.get(name)
    if user is None:
        if unit is None:
            return [
                CheckResult(
                    "service user",
                    "skip",
                    f"no {name} user and no {SERVICE_UNIT}: not installed as a service",
                )
            ]
        return [
            CheckResult(
                "service user",
                "fail",
                f"{unit.path} runs as User={name}, who is not in {passwd_path}: "
                "the service cannot start",
                add_user,
            )
        ]
    rows: list[CheckResult] = []
    detail = f"{name} uid {user.uid}"
    video = groups.get("video")
    if video is None:
        rows.append(
            CheckResult("service user", "ok", detail + f" (no video group in {group_path})")
        )
    elif user.gid == video.gid or name in video.members:
        rows.append(CheckResult("service user", "ok", detail + ", in the video group"))
    else:
        granted = unit is not None and "video" in unit.supplementary_groups
        needed = config.source.kind == "camera" and not granted
        why = (
            "; the unit adds it (SupplementaryGroups=video), runs outside the unit lack it"
            if granted
            else "; it cannot open /dev/video*"
        )
        rows.append(
            CheckResult(
                "service user",
                "fail" if needed else "warn",
                detail + f", not in the video group{why}",
                f"sudo adduser {name} video",
            )
        )
    try:
        owner_uid = state_dir.stat().st_uid
    except OSError:
        return rows  # check_state_dir reports a missing or unreadable state dir
    if owner_uid != user.uid:
        owner = next((u.name for u in users.values() if u.uid == owner_uid), f"uid {owner_uid}")
        rows.append(
            CheckResult(
                "state dir owner",
                "warn",
                f"{state_dir} belongs to {owner}, the service runs as {name}",
                f"sudo chown -R {name}:{name} {state_dir}",
            )
        )
    return rows


def check_keyring(config: AgentConfig, state_dir: Path) -> list[CheckResult]:
    """Keyring, TUF root and device id, as `edge-agent provision` leaves them."""
    rows: list[CheckResult] = []
    needed = config.ota.enabled
    keyring_dir = state_dir / "keyring"
    provision_hint = (
        f"edge-agent provision --state-dir {state_dir} --tuf-root root.json "
        "--keyring keys/ --device-id <id>"
    )
    if not (keyring_dir / "keyring.json").is_file():
        rows.append(
            CheckResult(
                "keyring",
                "fail" if needed else "warn",
                f"{keyring_dir}/keyring.json missing: no package can be verified",
                provision_hint,
            )
        )
    else:
        try:
            from agent.package.keys import Keyring

            Keyring.load(keyring_dir)
            rows.append(CheckResult("keyring", "ok", f"{keyring_dir}/keyring.json"))
        except (EdgeAgentError, ValueError, OSError) as exc:
            rows.append(
                CheckResult("keyring", "fail", f"{keyring_dir}: {exc}"[:200], provision_hint)
            )
    if needed and not (state_dir / "tuf" / "root.json").is_file():
        rows.append(
            CheckResult("tuf root", "fail", f"{state_dir}/tuf/root.json missing", provision_hint)
        )
    return rows


def check_repository(config: AgentConfig, timeout_s: float) -> CheckResult:
    url = config.ota.repository_url
    if not url:
        return CheckResult("repository", "skip", "ota.repository_url not set")
    target = url.rstrip("/") + "/metadata/timestamp.json"
    import requests

    try:
        response = requests.head(target, timeout=timeout_s, allow_redirects=True)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        # an offline device is normal (telemetry and updates wait), so this is not blocking
        return CheckResult(
            "repository",
            "warn",
            f"{target}: unreachable ({reason})",
            "check the network, DNS and any proxy; the agent keeps running offline",
        )
    code = response.status_code
    if code < 400:
        return CheckResult("repository", "ok", f"{target}: HTTP {code}")
    if code < 500:
        return CheckResult(
            "repository",
            "fail",
            f"{target}: HTTP {code}",
            "ota.repository_url must be the folder that holds metadata/ and targets/",
        )
    return CheckResult(
        "repository", "warn", f"{target}: HTTP {code}", "the server has a problem; retry later"
    )


# ------------------------------------------------------------------------------ all


def run_doctor(config: AgentConfig, env: DoctorEnv | None = None) -> list[CheckResult]:
    """Run every check; the order is the order of the printed table."""
    env = env or DoctorEnv()
    state_dir = env.state_dir or config.state_dir
    rows = [check_python(), check_numpy(), *check_backends(config), check_board(env)]
    rows += [check_camera(config, env), check_sensors(config, env), check_throttle(env)]
    rows += [check_clock(env), check_disk(state_dir), check_state_dir(state_dir)]
    rows += check_service_user(config, env, state_dir)
    rows += check_keyring(config, state_dir)
    rows.append(check_repository(config, env.repo_timeout_s))
    return rows


def blocking(rows: Sequence[CheckResult]) -> list[CheckResult]:
    return [r for r in rows if r.status == "fail"]


def report_json(rows: Sequence[CheckResult]) -> str:
    return json.dumps({"ok": not blocking(rows), "checks": [r.to_dict() for r in rows]}, indent=2)


# ------------------------------------------------------------------ operator checks


def check_config_file(given: Path | None, default_path: Path) -> CheckResult:
    """Which config the doctor judged: the given one, the default one, or none (defaults)."""
    if given is not None:
        return CheckResult("config", "ok", str(given))
    if default_path.is_file():
        return CheckResult("config", "ok", f"{default_path} (the default path)")
    return CheckResult(
        "config",
        "warn",
        f"{default_path} not found: checking with the built-in defaults",
        f"edge-agent config init --out {default_path}, or pass --config FILE",
    )


def check_golden_set(config: AgentConfig) -> CheckResult:
    """The gate needs a readable golden set before any OTA update can pass."""
    golden = config.ota.golden_dir
    if golden is None:
        if config.ota.enabled:
            return CheckResult(
                "golden set",
                "fail",
                "ota.enabled but ota.golden_dir is not set: every update would be refused",
                "set ota.golden_dir to a folder with inputs.npy and labels.npy (golden_local/)",
            )
        return CheckResult("golden set", "skip", "ota.golden_dir not set (OTA off)")
    from agent.ota.gate_data import load_golden_set

    try:
        golden_set = load_golden_set(golden)
    except EdgeAgentError as exc:
        return CheckResult(
            "golden set", "fail", f"{golden}: {exc}"[:200], "see golden_local/README.md"
        )
    rows = len(golden_set.labels)
    return CheckResult("golden set", "ok", f"{golden}: {rows} rows")


def check_active_model(config: AgentConfig, state_dir: Path) -> CheckResult:
    """The model the daemon would load: the installed package, else model.path."""
    from agent.ota import install

    current = install.resolve(state_dir, install.CURRENT)
    if current is not None:
        try:
            manifest = json.loads((current / "manifest.json").read_bytes())
            return CheckResult(
                "active model",
                "ok",
                f"{manifest.get('name')} {manifest.get('version')} ({current})",
            )
        except (OSError, ValueError) as exc:
            return CheckResult(
                "active model",
                "fail",
                f"{current}/manifest.json unreadable ({exc})",
                "edge-agent rollback, or reinstall the package",
            )
    path = config.model.path
    if path is None:
        return CheckResult(
            "active model",
            "fail",
            f"no installed package in {state_dir} and model.path not set",
            "edge-agent install PKG.tar, or set model.path",
        )
    if not path.is_file():
        return CheckResult("active model", "fail", f"model.path {path} not found", "fix model.path")
    return CheckResult("active model", "ok", f"{path} (model.path)")


def check_daemon(config: AgentConfig, state_dir: Path) -> CheckResult:
    """Whether a daemon is writing its status file (fresh, with a live pid)."""
    path = config.status.path or state_dir / "status.json"
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return CheckResult(
            "daemon", "warn", f"{path}: no status file (not running)", "systemctl start edge-agent"
        )
    except (OSError, ValueError) as exc:
        return CheckResult("daemon", "warn", f"{path}: unreadable ({exc})")
    if not isinstance(snap, dict):
        return CheckResult("daemon", "warn", f"{path}: not a JSON object")
    age_s = time.time() - float(snap.get("updated", 0) or 0)
    pid = snap.get("pid")
    alive = isinstance(pid, int) and pid > 0 and _pid_exists(pid)
    if snap.get("state") == "stopped" or not alive:
        return CheckResult(
            "daemon", "warn", f"not running (last state {snap.get('state')})",
            "systemctl start edge-agent; journalctl -u edge-agent for why it stopped",
        )  # fmt: skip
    if age_s > max(5.0, 5 * config.status.interval_s):
        return CheckResult(
            "daemon", "fail", f"pid {pid} alive but status {age_s:.0f} s old (stalled)",
            "systemctl restart edge-agent; edge-agent status --watch",
        )  # fmt: skip
    return CheckResult(
        "daemon", "ok", f"{snap.get('state')}, pid {pid}, {snap.get('fps')} FPS, {age_s:.0f} s ago"
    )


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A backlog older than this means uploads have not worked for a long while.
BACKLOG_WARN_AGE_S = 24 * 3600


def check_telemetry_backlog(config: AgentConfig, state_dir: Path) -> CheckResult:
    from agent.telemetry.status import telemetry_status

    if not config.telemetry.enabled:
        return CheckResult("telemetry", "skip", "telemetry.enabled is false")
    db = config.telemetry.db_path or state_dir / "telemetry.db"
    st = telemetry_status(db)
    if not st.get("exists"):
        return CheckResult("telemetry", "ok", f"{db}: no store yet (created on first start)")
    if st.get("error"):
        return CheckResult("telemetry", "warn", f"{db}: {st['error']}")
    backlog = int(st.get("backlog_rows") or 0)
    detail = f"backlog {backlog} rows ({st.get('backlog_bytes', 0)} bytes)"
    oldest = st.get("oldest_unix_ns")
    error = st.get("last_upload_error")
    if not config.telemetry.endpoint:
        return CheckResult("telemetry", "ok", f"{detail}; no endpoint (kept on the device)")
    old = backlog and oldest and time.time() - int(oldest) / 1e9 > BACKLOG_WARN_AGE_S
    if old or (backlog and error):
        return CheckResult(
            "telemetry",
            "warn",
            f"{detail}; last upload error: {error or 'none'}"[:200],
            f"check telemetry.endpoint {config.telemetry.endpoint} and the token; "
            "edge-agent telemetry flush shows the error",
        )
    return CheckResult("telemetry", "ok", detail)


def operator_checks(config: AgentConfig, env: DoctorEnv | None = None) -> list[CheckResult]:
    env = env or DoctorEnv()
    state_dir = env.state_dir or config.state_dir
    return [
        check_golden_set(config),
        check_active_model(config, state_dir),
        check_daemon(config, state_dir),
        check_telemetry_backlog(config, state_dir),
    ]


def format_report(rows: Sequence[CheckResult], width: int = 80) -> str:
    """The table in `width` columns: status, check, detail wrapped, each fix on its own line."""
    import textwrap

    name_w = max(len(r.name) for r in rows) if rows else 5
    indent = " " * (6 + name_w + 2)
    out = []
    for r in rows:
        head = f"{r.status.upper():<6}{r.name:<{name_w}}  "
        out += textwrap.wrap(
            r.detail or "-",
            width,
            initial_indent=head,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )
        if r.fix:
            out += textwrap.wrap(
                f"fix: {r.fix}",
                width,
                initial_indent=indent,
                subsequent_indent=indent + "     ",
                break_on_hyphens=False,
                break_long_words=False,
            )
    return "\n".join(out)
