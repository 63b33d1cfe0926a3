"""The package manifest: strict parsing of manifest.json bytes into frozen data, and back."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agent.errors import ManifestError
from agent.package.semver import Version, parse_version
from agent.runtime.base import Quantization, TensorSpec

MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "manifest.sig.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURES_NAME})
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_FILES = 1024
MAX_LABELS = 100_000
MAX_PATH_CHARS = 200
MAX_PATH_DEPTH = 8

TASKS = ("classification", "detection", "segmentation", "embedding", "regression", "keyring")
RUNTIME_KINDS = ("onnx", "tflite", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
LAYOUTS = ("NCHW", "NHWC", "flat")
COLOR_ORDERS = ("RGB", "BGR", "GRAY")
# Detector output layouts (agent/pipeline/detection.py decodes each).
DETECTION_LAYOUTS = ("yolo", "yolo_transposed", "ssd")
# Gate thresholds a package may tighten (docs/CONTRACTS.md, "Gate thresholds").
# the shadow thresholds a package may tighten (agent/ota/shadow.py TIGHTEN_BY_RAISING)
SHADOW_KEYS = (
    "min_frames",
    "before_activation_frames",
    "agreement_min",
    "box_iou_min",
    "confidence_drop_max",
    "class_hist_distance_max",
    "latency_ratio_max",
    "latency_slack_ms",
    "error_rate_max",
)
GATE_KEYS = (
    "accuracy_drop_max_pp",
    "f1_drop_max_pp",
    "ece_increase_max",
    "agreement_min",
    "prob_mse_max",
    "logit_cosine_min",
    "class_recall_drop_max_pp",
    "latency_p95_ratio_max",
    "latency_p95_slack_ms",
    "memory_added_max_mb",
    "map_drop_max_pp",
    "miou_drop_max_pp",
    "gate_timeout_s",
    "gate_memory_max_mb",
    "map50_95_drop_max_pp",
    "class_ap_drop_max_pp",
)

# Validating patterns: always used with fullmatch (``$`` alone lets "digits\n" through) and
# re.ASCII (``\d`` alone takes any script's digits).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_SHA256_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z", re.ASCII)
_PATH_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", re.ASCII)
_FEATURE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class FileEntry:
    """One file of the package: its relative path, sha256 (hex) and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RuntimeSpec:
    """Which runtime runs the model, at what precision, and which listed file it is."""

    kind: str
    precision: str
    model: str


@dataclass(frozen=True)
class PreprocessSpec:
    """How a frame becomes the model input (same field names as config.PreprocessConfig)."""

    resize: tuple[int, ...] = ()
    layout: str = "NCHW"
    color_order: str = "RGB"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 1.0


@dataclass(frozen=True)
class CompatSpec:
    """What the device must offer: agent version, hardware class, runtime features."""

    min_agent_version: str = "0.0.0"
    hardware_classes: tuple[str, ...] = ()
    runtime_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build it with parse_manifest(); the signed bytes stay the truth."""

    name: str
    version: str
    release_counter: int
    created: str
    task: str
    files: tuple[FileEntry, ...]
    compat: CompatSpec = field(default_factory=CompatSpec)
    runtime: RuntimeSpec | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    preprocess: PreprocessSpec | None = None
    labels: tuple[str, ...] = ()
    gate: Mapping[str, float] = field(default_factory=dict)
    # stricter shadow-evaluation thresholds (SHADOW_KEYS); the device's policy otherwise
    shadow: Mapping[str, float] = field(default_factory=dict)
    extensions: Mapping[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    # task detection: the output layout and post-processing (see DETECTION_KEYS)
    detection: Mapping[str, Any] = field(default_factory=dict)

    @property
    def semver(self) -> Version:
        return parse_version(self.version)

    @property
    def package_id(self) -> str:
        """``<name>-<version>``: the tar's stem and the installed directory's name."""
        return f"{self.name}-{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise ManifestError(f"{MANIFEST_NAME}: no file {path!r} in files")

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the manifest.json layout (for --json output and for writing)."""
        out: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "release_counter": self.release_counter,
            "created": self.created,
            "task": self.task,
        }
        if self.runtime is not None:
            out["runtime"] = {
                "kind": self.runtime.kind,
                "precision": self.runtime.precision,
                "model": self.runtime.model,
            }
        if self.inputs or self.outputs:
            out["inputs"] = [_tensor_to_dict(t) for t in self.inputs]
            out["outputs"] = [_tensor_to_dict(t) for t in self.outputs]
        if self.preprocess is not None:
            p = self.preprocess
            out["preprocess"] = {
                "resize": list(p.resize),
                "layout": p.layout,
                "color_order": p.color_order,
                "mean": list(p.mean),
                "std": list(p.std),
                "scale": p.scale,
            }
        if self.labels:
            out["labels"] = list(self.labels)
        out["compat"] = {
            "min_agent_version": self.compat.min_agent_version,
            "hardware_classes": list(self.compat.hardware_classes),
            "runtime_features": list(self.compat.runtime_features),
        }
        if self.gate:
            out["gate"] = dict(self.gate)
        if self.shadow:
            out["shadow"] = dict(self.shadow)
        if self.detection:
            out["detection"] = dict(self.detection)
        out.update(self.extensions)
        out["files"] = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files]
        return out


def _tensor_to_dict(t: TensorSpec) -> dict[str, Any]:
    q = None
    if t.quantization is not None:
        q = {"scale": t.quantization.scale, "zero_point": t.quantization.zero_point}
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "quantization": q}


def manifest_bytes(data: Mapping[str, Any]) -> bytes:
    """Serialize manifest data the one way the builder writes it (validated first)."""
    raw = (json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode()
    parse_manifest(raw)
    return raw


# ---------------------------------------------------------------------------------------
# Parsing untrusted bytes
# ---------------------------------------------------------------------------------------

_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, counted without recursion."""
    brackets = re.sub(rb"[^\[\]{}]", b"", _STRING_RE.sub(b"", raw))
    depth = deepest = 0
    for ch in brackets:
        if ch in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_duplicate_keys(source: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                # Two parsers may pick different copies of a duplicated key: refuse it.
                raise ManifestError(f"{source}: duplicate key {key!r}")
            out[key] = value
        return out

    return hook


def _refuse_constant(source: str) -> Any:
    def hook(name: str) -> Any:
        raise ManifestError(f"{source}: {name} is not allowed in JSON")

    return hook


def load_json_strict(
    raw: bytes, source: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Decode untrusted JSON: size and depth caps, UTF-8 only, no duplicate keys, no NaN."""
    if len(raw) > max_bytes:
        raise ManifestError(f"{source}: {len(raw)} bytes is more than the {max_bytes} allowed")
    depth = json_depth(raw)
    if depth > max_depth:
        raise ManifestError(f"{source}: JSON nested {depth} deep, more than {max_depth} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{source}: not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys(source),
            parse_constant=_refuse_constant(source),
        )
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        # Over-long integers (int_max_str_digits) and other decoder limits.
        raise ManifestError(f"{source}: invalid JSON ({str(exc)[:100]})") from None


def parse_manifest(
    raw: bytes, source: str = MANIFEST_NAME, max_bytes: int = MAX_MANIFEST_BYTES
) -> Manifest:
    """Parse and validate manifest bytes; every problem is one ManifestError naming its path."""
    data = load_json_strict(raw, source, max_bytes)
    return validate_manifest(data, source)


class _Check:
    """Typed accessors over untrusted JSON that fail with the JSON path of the bad value."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        raise ManifestError(
            f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}"
        )

    def obj(
        self, v: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {_kind(v)}")
        for key in required:
            if key not in v:
                self.fail(_join(path, key), "missing")
        allowed = set(required) | set(optional)
        for key in v:
            if key not in allowed and not (path == "" and key.startswith("x-")):
                self.fail(_join(path, key), f"unknown key (known: {', '.join(sorted(allowed))})")
        return v

    def string(
        self, v: Any, path: str, pattern: re.Pattern[str] | None = None, max_chars: int = 256
    ) -> str:
        if not isinstance(v, str):
            self.fail(path, f"expected a string, got {_kind(v)}")
        if len(v) > max_chars:
            self.fail(path, f"longer than {max_chars} characters")
        if pattern is not None and not pattern.fullmatch(v):
            shown = v if len(v) <= 40 else v[:37] + "..."
            self.fail(path, f"{shown!r} does not match {pattern.pattern}")
        return v

    def choice(self, v: Any, path: str, choices: Sequence[str]) -> str:
        if not isinstance(v, str) or v not in choices:
            self.fail(path, f"expected one of {', '.join(choices)}, got {_shown(v)}")
        return v

    def integer(self, v: Any, path: str, lo: int, hi: int) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(path, f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            self.fail(path, f"{v} is outside {lo}..{hi}")
        return v

    def number(self, v: Any, path: str, positive: bool = False) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.fail(path, f"expected a number, got {_kind(v)}")
        if positive and not v > 0:
            self.fail(path, f"must be above 0, got {v}")
        return float(v)

    def array(self, v: Any, path: str, max_items: int, min_items: int = 0) -> list[Any]:
        if not isinstance(v, list):
            self.fail(path, f"expected a list, got {_kind(v)}")
        if len(v) > max_items:
            self.fail(path, f"{len(v)} items, more than the {max_items} allowed")
        if len(v) < min_items:
            self.fail(path, f"expected at least {min_items} item(s)")
        return v


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)  # fmt: skip


def _shown(v: Any) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    return _kind(v)


def check_relative_path(path: str) -> str | None:
    """Why ``path`` is not a safe relative POSIX path inside a package, or None when it is."""
    if not path:
        return "empty path"
    if len(path) > MAX_PATH_CHARS:
        return f"path longer than {MAX_PATH_CHARS} characters"
    if path.startswith("/"):
        return "absolute path"
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "backslash or control character in path"
    parts = path.split("/")
    if ".." in parts:
        return "path with '..'"
    if len(parts) > MAX_PATH_DEPTH:
        return f"path deeper than {MAX_PATH_DEPTH} levels"
    for part in parts:
        if not _PATH_PART_RE.fullmatch(part):
            return f"path part {part!r} is not allowed (letters, digits, '._-', no leading dot)"
    return None


def _tensor(c: _Check, v: Any, path: str) -> TensorSpec:
    d = c.obj(v, path, ("name", "dtype", "shape"), ("quantization",))
    name = c.string(d["name"], f"{path}.name", max_chars=128)
    dtype = c.choice(d["dtype"], f"{path}.dtype", DTYPES)
    shape_raw = c.array(d["shape"], f"{path}.shape", max_items=8)
    shape: list[int | None] = []
    for i, dim in enumerate(shape_raw):
        shape.append(None if dim is None else c.integer(dim, f"{path}.shape[{i}]", 1, 1 << 31))
    q = d.get("quantization")
    quant = None
    if q is not None:
        qd = c.obj(q, f"{path}.quantization", ("scale", "zero_point"))
        quant = Quantization(
            scale=c.number(qd["scale"], f"{path}.quantization.scale", positive=True),
            zero_point=c.integer(
                qd["zero_point"], f"{path}.quantization.zero_point", -(1 << 31), 1 << 31
            ),
        )
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), quantization=quant)


def _detection_block(c: _Check, v: Any, task: str, outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The ``detection`` block: which output layout the model has and how to post-process it."""
    d = c.obj(
        v,
        "detection",
        ("layout",),
        ("score_threshold", "iou_threshold", "max_detections", "box_units"),
    )
    if task != "detection":
        c.fail("detection", f"only for task 'detection', not {task!r}")
    layout = c.choice(d["layout"], "detection.layout", DETECTION_LAYOUTS)
    out: dict[str, Any] = {"layout": layout}
    for key, lo, hi in (("score_threshold", 0.0, 1.0), ("iou_threshold", 1e-9, 1.0)):
        if key in d:
            value = c.number(d[key], f"detection.{key}")
            if not lo <= value <= hi:
                c.fail(f"detection.{key}", f"{value} is outside {lo:g}..{hi:g}")
            out[key] = value
    if "max_detections" in d:
        out["max_detections"] = c.integer(
            d["max_detections"], "detection.max_detections", 1, 10_000
        )
    if "box_units" in d:
        out["box_units"] = c.choice(d["box_units"], "detection.box_units", ("pixels", "normalized"))
    need = 3 if layout == "ssd" else 1
    if outputs and len(outputs) < need:
        c.fail(
            "detection.layout", f"{layout} needs {need}+ outputs, the manifest lists {len(outputs)}"
        )
    if outputs and layout != "ssd" and len(outputs[0].shape) != 3:
        c.fail(
            "detection.layout", f"{layout} needs an output of rank 3, got {list(outputs[0].shape)}"
        )
    return out


def validate_manifest(data: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Check decoded manifest data against the schema and build a Manifest."""
    c = _Check(source)
    top_required = ("format", "name", "version", "release_counter", "created", "task", "files")
    top_optional = (
        "runtime",
        "inputs",
        "outputs",
        "preprocess",
        "labels",
        "compat",
        "gate",
        "detection",
        "shadow",
    )
    d = c.obj(data, "", top_required, top_optional)
    fmt = c.integer(d["format"], "format", 0, 1 << 16)
    if fmt != FORMAT_VERSION:
        c.fail(
            "format", f"format {fmt} is not supported (this agent reads format {FORMAT_VERSION})"
        )
    name = c.string(d["name"], "name", _NAME_RE)
    version = str(parse_version(d["version"], f"{source}: version"))
    if version != d["version"]:  # pragma: no cover - parse_version round-trips exactly
        c.fail("version", "not in canonical form")
    counter = c.integer(d["release_counter"], "release_counter", 0, (1 << 63) - 1)
    created = c.string(d["created"], "created", _CREATED_RE, max_chars=40)
    task = c.choice(d["task"], "task", TASKS)

    files = _files_block(c, d["files"])
    listed = {f.path for f in files}
    runtime, inputs, outputs = _model_block(c, d, task, listed)
    preprocess = _preprocess_block(c, d["preprocess"]) if "preprocess" in d else None
    labels = tuple(
        c.string(v, f"labels[{i}]", max_chars=256)
        for i, v in enumerate(c.array(d.get("labels", []), "labels", MAX_LABELS))
    )
    compat = _compat_block(c, d["compat"], source) if "compat" in d else CompatSpec()
    gate: dict[str, float] = {}
    if "gate" in d:
        gd = c.obj(d["gate"], "gate", (), GATE_KEYS)
        gate = {k: c.number(v, f"gate.{k}") for k, v in gd.items()}

    shadow: dict[str, float] = {}
    if "shadow" in d:
        sd = c.obj(d["shadow"], "shadow", (), SHADOW_KEYS)
        shadow = {k: c.number(v, f"shadow.{k}") for k, v in sd.items()}

    detection: dict[str, Any] = {}
    if "detection" in d:
        detection = _detection_block(c, d["detection"], task, outputs)

    extensions = {k: v for k, v in d.items() if k.startswith("x-")}
    return Manifest(
        detection=detection,
        format=fmt,
        name=name,
        version=version,
        release_counter=counter,
        created=created,
        task=task,
        files=tuple(files),
        compat=compat,
        runtime=runtime,
        inputs=inputs,
        outputs=outputs,
        preprocess=preprocess,
        labels=labels,
        gate=gate,
        shadow=shadow,
        extensions=extensions,
    )


def _files_block(c: _Check, items: Any) -> list[FileEntry]:
    """files[]: safe relative paths, listed once (case-folded), none also a directory."""
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(c.array(items, "files", MAX_FILES)):
        p = f"files[{i}]"
        fd = c.obj(raw, p, ("path", "sha256", "size"))
        fpath = c.string(fd["path"], f"{p}.path", max_chars=MAX_PATH_CHARS)
        problem = check_relative_path(fpath)
        if problem:
            c.fail(f"{p}.path", f"{problem}: {fpath!r}")
        if fpath in RESERVED_NAMES:
            c.fail(f"{p}.path", f"{fpath!r} is reserved for the package itself")
        # Case-folded, so a case-insensitive filesystem cannot merge two listed files.
        if fpath.lower() in seen:
            c.fail(f"{p}.path", f"duplicate path {fpath!r}")
        seen.add(fpath.lower())
        sha = fd["sha256"]
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            c.fail(f"{p}.sha256", "expected 64 hex chars")
        size = c.integer(fd["size"], f"{p}.size", 0, (1 << 62))
        files.append(FileEntry(fpath, sha, size))
    listed = {f.path for f in files}
    # A file cannot also be a directory of another listed file.
    for f in files:
        parts = f.path.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in listed:
                c.fail("files", f"{'/'.join(parts[:n])!r} is both a file and a directory")
    return files


def _model_block(
    c: _Check, d: Mapping[str, Any], task: str, listed: set[str]
) -> tuple[RuntimeSpec | None, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """runtime, inputs and outputs: required for every task but a keyring update."""
    runtime = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    if task != "keyring":
        for key in ("runtime", "inputs", "outputs"):
            if key not in d:
                c.fail(key, f"missing (required for task {task!r})")
    if "runtime" in d:
        rd = c.obj(d["runtime"], "runtime", ("kind", "precision", "model"))
        runtime = RuntimeSpec(
            kind=c.choice(rd["kind"], "runtime.kind", RUNTIME_KINDS),
            precision=c.choice(rd["precision"], "runtime.precision", PRECISIONS),
            model=c.string(rd["model"], "runtime.model", max_chars=MAX_PATH_CHARS),
        )
        if runtime.model not in listed:
            c.fail("runtime.model", f"{runtime.model!r} is not one of the listed files")
    if "inputs" in d:
        inputs = tuple(
            _tensor(c, v, f"inputs[{i}]")
            for i, v in enumerate(c.array(d["inputs"], "inputs", 64, min_items=1))
        )
    if "outputs" in d:
        outputs = tuple(
            _tensor(c, v, f"outputs[{i}]")
            for i, v in enumerate(c.array(d["outputs"], "outputs", 64, min_items=1))
        )
    return runtime, inputs, outputs


def _preprocess_block(c: _Check, raw: Any) -> PreprocessSpec:
    """preprocess: resize, layout, colour order, mean/std and scale (defaults where absent)."""
    pd = c.obj(
        raw,
        "preprocess",
        (),
        ("resize", "layout", "color_order", "mean", "std", "scale"),
    )
    resize = tuple(
        c.integer(v, f"preprocess.resize[{i}]", 1, 1 << 16)
        for i, v in enumerate(c.array(pd.get("resize", []), "preprocess.resize", 3))
    )
    mean = tuple(
        c.number(v, f"preprocess.mean[{i}]")
        for i, v in enumerate(c.array(pd.get("mean", []), "preprocess.mean", 4))
    )
    std = tuple(
        c.number(v, f"preprocess.std[{i}]", positive=True)
        for i, v in enumerate(c.array(pd.get("std", []), "preprocess.std", 4))
    )
    return PreprocessSpec(
        resize=resize,
        layout=c.choice(pd.get("layout", "NCHW"), "preprocess.layout", LAYOUTS),
        color_order=c.choice(pd.get("color_order", "RGB"), "preprocess.color_order", COLOR_ORDERS),
        mean=mean,
        std=std,
        scale=c.number(pd.get("scale", 1.0), "preprocess.scale", positive=True),
    )


def _compat_block(c: _Check, raw: Any, source: str) -> CompatSpec:
    """compat: the lowest agent version, hardware classes and runtime features it needs."""
    cd = c.obj(raw, "compat", (), ("min_agent_version", "hardware_classes", "runtime_features"))
    min_agent = str(
        parse_version(cd.get("min_agent_version", "0.0.0"), f"{source}: compat.min_agent_version")
    )
    return CompatSpec(
        min_agent_version=min_agent,
        hardware_classes=tuple(
            c.string(v, f"compat.hardware_classes[{i}]", _FEATURE_RE)
            for i, v in enumerate(
                c.array(cd.get("hardware_classes", []), "compat.hardware_classes", 64)
            )
        ),
        runtime_features=tuple(
            c.string(v, f"compat.runtime_features[{i}]", _FEATURE_RE)
            for i, v in enumerate(
                c.array(cd.get("runtime_features", []), "compat.runtime_features", 64)
            )
        ),
    )
