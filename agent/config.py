"""YAML configuration loaded into frozen dataclasses; every bad key is named with its path."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from agent.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Generic loader
# ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " or ".join(repr(m.value) for m in tp)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _where(source: str, path: str) -> str:
    return f"{source}:{path}" if path else source


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    origin = get_origin(tp)
    fail = ConfigError(f"{_where(source, path)}: expected {_type_name(tp)}, got {_got(value)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise fail
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise fail
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise fail
        return _build(tp, value, path, source)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise fail from None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise fail
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise fail
        key_tp, val_tp = get_args(tp) or (Any, Any)
        out: dict[Any, Any] = {}
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            out[_convert(key_tp, k, sub, source)] = _convert(val_tp, v, sub, source)
        return types.MappingProxyType(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise fail
    raise ConfigError(f"{_where(source, path)}: unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: type[T], data: Mapping[str, Any], path: str, source: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(source, sub)}: unknown key (known keys: {known})")
        kwargs[key] = _convert(hints[key], value, sub, source)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_where(source, path)}: {exc}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        problem = check()
        if problem:
            raise ConfigError(f"{_where(source, path)}: {problem}")
    return obj


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, source: str = "<config>") -> T:
    """Build the dataclass ``cls`` from plain data, raising ConfigError naming the bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_got(data)}")
    return _build(cls, data, "", source)


def load_yaml_file(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read a YAML file with ``safe_load`` and a size cap; errors name the file and line."""
    # Imported here: textio brings numpy, which loading a config does not otherwise need.
    from agent.textio import read_regular

    raw = read_regular(path, max_bytes, "file", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None


def to_plain(obj: Any) -> Any:
    """Turn a config dataclass tree back into plain YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


# ---------------------------------------------------------------------------------------
# The agent's configuration. Defaults work on a Raspberry Pi 4 with no extra setup.
# ---------------------------------------------------------------------------------------

BackendName = Literal["auto", "onnx", "litert", "tensorrt"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run when no OTA package is installed yet, and how."""

    path: Path | None = None
    backend: BackendName = "auto"
    # ORT providers in order of preference; "auto" means TensorRT -> CUDA -> CPU.
    providers: tuple[str, ...] = ("auto",)
    intra_op_threads: int = 1
    warmup_runs: int = 3
    labels: tuple[str, ...] = ()
    engine_cache_dir: Path | None = None

    def check(self) -> str | None:
        if self.intra_op_threads < 1:
            return "intra_op_threads: must be at least 1"
        if self.warmup_runs < 0:
            return "warmup_runs: must not be negative"
        return None


@dataclass(frozen=True)
class PreprocessConfig:
    """How a frame becomes a model input and its output a result (a package overrides it)."""

    resize: tuple[int, ...] = ()
    layout: Literal["NCHW", "NHWC", "flat"] = "NCHW"
    color_order: Literal["RGB", "BGR", "GRAY"] = "RGB"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 1.0
    # What the daemon does with the model's output: classification (top-k with labels),
    # detection (boxes with a score threshold and NMS) or segmentation (class pixel shares).
    task: Literal["classification", "detection", "segmentation"] = "classification"
    top_k: int = 1
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    # detection: the output layout a package's `detection` block names ("" : the older
    # [N, K, 6] (x1, y1, x2, y2, score, class) or boxes/scores/classes tensors)
    detection_layout: Literal["", "yolo", "yolo_transposed", "ssd"] = ""
    max_detections: int = 100
    box_units: Literal["pixels", "normalized"] = "pixels"

    def check(self) -> str | None:
        if self.resize and (len(self.resize) != 2 or min(self.resize) < 1):
            return "resize: must be [height, width] with both at least 1"
        if any(s == 0 for s in self.std):
            return "std: must not contain 0"
        if self.top_k < 1:
            return "top_k: must be at least 1"
        if not 1 <= self.max_detections <= 10_000:
            return "max_detections: must be within 1..10000"
        return None


@dataclass(frozen=True)
class SourceConfig:
    """Where frames come from."""

    kind: Literal["synthetic", "directory", "video", "camera"] = "synthetic"
    path: Path | None = None
    device: int = 0
    watch: bool = False
    loop: bool = False
    seed: int = 0
    reopen_backoff_max_s: float = 30.0
    # synthetic: "digits" draws 8x8-style digit strokes, "random" uniform noise, "tensor"
    # ready float32 model inputs (no preprocessing cost: for benchmarks), "shapes" grey
    # squares, circles and triangles (the demo detector's frames, agent/demo/shapes.py).
    pattern: Literal["digits", "random", "tensor", "shapes"] = "digits"
    # synthetic frame size; 0 takes it from the model input
    width: int = 0
    height: int = 0
    channels: int = 0
    # stop after this many frames (0: never); the daemon exits 0 when its source ends
    max_frames: int = 0
    poll_interval_s: float = 0.5
    # synthetic digits: the ink's contrast against the background. 1.0 draws white strokes
    # on black (like the golden set); lower values lift the background towards the ink, the
    # washed-out look of an over-exposed field camera (0.5: background at mid grey).
    contrast: float = 1.0

    def check(self) -> str | None:
        if self.kind in ("directory", "video") and self.path is None:
            return f"path: required for a {self.kind} source"
        if not 0 < self.contrast <= 1:
            return "contrast: must be in (0, 1]"
        if self.max_frames < 0 or self.width < 0 or self.height < 0 or self.channels < 0:
            return "max_frames, width, height, channels: must not be negative"
        if self.reopen_backoff_max_s <= 0 or self.poll_interval_s <= 0:
            return "reopen_backoff_max_s and poll_interval_s: must be positive"
        return None


@dataclass(frozen=True)
class SchedulerConfig:
    """Frame pacing."""

    fps_cap: float = 15.0
    max_batch: int = 1
    max_wait_ms: float = 0.0
    # SIGTERM: how long the daemon waits for sinks to drain before it exits anyway
    drain_timeout_s: float = 5.0

    def check(self) -> str | None:
        if self.fps_cap < 0:
            return "fps_cap: must not be negative (0 means uncapped)"
        if self.max_batch < 1:
            return "max_batch: must be at least 1"
        if self.max_wait_ms < 0 or self.drain_timeout_s < 0:
            return "max_wait_ms and drain_timeout_s: must not be negative"
        return None


@dataclass(frozen=True)
class GovernorConfig:
    """Thermal and resource guard rails."""

    enabled: bool = True
    interval_s: float = 1.0
    soft_limit_c: float = 70.0
    hard_limit_c: float = 85.0
    hysteresis_c: float = 5.0
    step_factor: float = 0.75
    min_fps: float = 1.0
    max_cpu_percent: float = 95.0
    min_free_memory_mb: float = 64.0
    thermal_root: Path = Path("/sys/class/thermal")
    hwmon_root: Path = Path("/sys/class/hwmon")
    throttle_file: Path | None = None
    # When set, every sensor is read under this root laid out like /sys (thermal, hwmon,
    # the RPi firmware get_throttled file, Jetson INA3221 rails); thermal_root, hwmon_root
    # and throttle_file are then ignored. Tests and benchmarks point it at a temp dir.
    sysfs_root: Path | None = None
    use_psutil: bool = True
    # Ask `vcgencmd get_throttled` when the firmware sysfs file is not there (older RPi OS).
    use_vcgencmd: bool = True

    def check(self) -> str | None:
        if self.hard_limit_c <= self.soft_limit_c:
            return "hard_limit_c: must be above soft_limit_c"
        if not 0 < self.step_factor < 1:
            return "step_factor: must be between 0 and 1"
        if self.hysteresis_c < 0 or self.interval_s <= 0 or self.min_fps <= 0:
            return "hysteresis_c >= 0, interval_s > 0 and min_fps > 0 are required"
        return None


@dataclass(frozen=True)
class SinkConfig:
    """One output sink for inference results."""

    kind: Literal["jsonl", "stdout", "http", "mqtt"] = "stdout"
    path: Path | None = None
    url: str | None = None
    topic: str | None = None
    max_bytes: int = 10 << 20
    backups: int = 3
    queue_size: int = 1000
    # jsonl: results are gathered this long and written together (0: one write each)
    flush_interval_s: float = 1.0
    timeout_s: float = 2.0
    # extra HTTP headers for the webhook (e.g. Authorization)
    headers: Mapping[str, str] = field(default_factory=dict)
    # MQTT broker: host and port (url is "mqtt://host:port")
    qos: int = 0

    def check(self) -> str | None:
        if self.kind == "jsonl" and self.path is None:
            return "path: required for a jsonl sink"
        if self.kind in ("http", "mqtt") and not self.url:
            return f"url: required for an {self.kind} sink"
        if self.kind == "mqtt" and not self.topic:
            return "topic: required for an mqtt sink"
        if self.queue_size < 1 or self.max_bytes < 1024 or self.backups < 0:
            return "queue_size >= 1, max_bytes >= 1024 and backups >= 0 are required"
        if not 0.0 <= self.flush_interval_s <= 60.0:
            return "flush_interval_s: must be between 0 and 60"
        return None


@dataclass(frozen=True)
class TelemetryConfig:
    """Offline telemetry store and upload."""

    enabled: bool = True
    db_path: Path | None = None
    max_bytes: int = 64 << 20
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    sample_rate: float = 0.01
    summary_interval_s: float = 60.0
    pii_fields: tuple[str, ...] = ()
    endpoint: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    upload_interval_s: float = 30.0
    batch_max_rows: int = 500
    batch_max_bytes: int = 512 << 10
    bandwidth_bytes_per_s: int = 0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    # Whole-request deadline: a server trickling a byte a second never trips read_timeout_s.
    request_deadline_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    queue_max: int = 10000
    flush_interval_s: float = 0.5

    def check(self) -> str | None:
        if not 0.0 <= self.sample_rate <= 1.0:
            return "sample_rate: must be between 0 and 1"
        if self.max_bytes < 1 << 20:
            return "max_bytes: must be at least 1048576 (1 MiB)"
        if self.batch_max_rows < 1 or self.batch_max_bytes < 1024:
            return "batch_max_rows / batch_max_bytes: must be at least 1 row and 1024 bytes"
        if self.queue_max < 100:
            return "queue_max: must be at least 100"
        if min(self.summary_interval_s, self.upload_interval_s, self.flush_interval_s) <= 0:
            return "summary_interval_s, upload_interval_s, flush_interval_s: must be positive"
        if self.bandwidth_bytes_per_s < 0:
            return "bandwidth_bytes_per_s: must not be negative (0 means no cap)"
        return None


@dataclass(frozen=True)
class OTAConfig:
    """Over-the-air updates."""

    enabled: bool = False
    repository_url: str | None = None
    channel: str = "stable"
    poll_interval_s: float = 3600.0
    poll_jitter_s: float = 300.0
    pin_version: str | None = None
    # The package name this device follows before it runs any package (afterwards: the
    # name it runs). A channel carrying another name is not followed.
    package: str | None = None
    golden_dir: Path | None = None
    policy_path: Path | None = None
    probation_frames: int = 200
    probation_s: float = 60.0
    crash_loop_limit: int = 3
    hardware_class: str = "generic"
    # Transport limits for TUF metadata and package downloads.
    proxy_url: str | None = None
    min_bytes_per_s: float = 1024.0
    download_deadline_s: float = 900.0
    # Free space kept untouched beyond what a download needs (logs, SQLite WAL).
    reserve_free_bytes: int = 64 << 20


@dataclass(frozen=True)
class StatusConfig:
    """Where the daemon publishes its live status."""

    path: Path | None = None
    interval_s: float = 1.0
    prometheus_port: int = 0
    # the control socket (JSON lines); None: state_dir/control.sock
    control_socket: Path | None = None

    def check(self) -> str | None:
        if self.interval_s <= 0:
            return "interval_s: must be positive"
        if not 0 <= self.prometheus_port <= 65535:
            return "prometheus_port: must be 0 (off) or a TCP port"
        return None


@dataclass(frozen=True)
class AgentConfig:
    """The whole configuration file."""

    device_id: str | None = None
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    sinks: tuple[SinkConfig, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    ota: OTAConfig = field(default_factory=OTAConfig)
    status: StatusConfig = field(default_factory=StatusConfig)


def load_config(path: Path) -> AgentConfig:
    """Load and validate an agent config file; relative paths resolve against its folder."""
    data = load_yaml_file(path)
    cfg = from_mapping(AgentConfig, data, source=str(path))
    return _resolve_paths(cfg, path.parent.resolve())


def _resolve_paths(obj: T, base: Path) -> T:
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            changes[f.name] = base / value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _resolve_paths(value, base)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            changes[f.name] = tuple(_resolve_paths(v, base) for v in value)
    return typing.cast(T, dataclasses.replace(obj, **changes)) if changes else obj
