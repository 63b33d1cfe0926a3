"""Golden sets and gate models: load and check the .npy files, resolve MODEL to a file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError, GoldenSetError, ModelError
from agent.ota.gate_detection import ImageBoxes
from agent.runtime.base import Backend, file_sha256
from agent.textio import load_npy, open_regular

GOLDEN_FILES = (
    "inputs.npy",
    "labels.npy",
    "slices.npy",
    "reference.npy",
    "annotations.json",
    "frames.npy",
    "preprocess.yaml",
)
GOLDEN_FILE_MAX_BYTES = 1 << 31
# A detection golden set: boxes in COCO JSON (images in row order) instead of labels.npy,
# and optionally how to decode a bare model file's outputs (a package's `detection` wins).
ANNOTATIONS_NAME = "annotations.json"
DETECTION_SPEC_NAME = "detection.yaml"
ANNOTATIONS_MAX_BYTES = 64 << 20
# Segmentation labels may mark pixels to ignore with this value (the common convention).
SEGMENTATION_IGNORE = 255
# A raw-frame golden set: frames as the source delivers them (uint8 HxW or HxWxC), either
# one array frames.npy [N,H,W(,C)] or a folder frames/ of one file per row (.npy or an
# image, in name order); each model's own preprocessing turns them into its input.
FRAMES_NAME = "frames.npy"
FRAMES_DIR = "frames"
# how a bare model file (no package manifest) preprocesses the frames; a package's own
# `preprocess` always wins
PREPROCESS_NAME = "preprocess.yaml"
RUNTIME_TO_BACKEND = {
    "onnx": "onnx",
    "tflite": "litert",
    "litert": "litert",
    "tensorrt": "tensorrt",
}
# Operator names that only occur in integer-quantized ONNX graphs; they appear verbatim in
# the protobuf bytes, so no onnx package is needed on the device to find them.
ONNX_INT8_MARKERS = (
    b"QuantizeLinear",
    b"QLinearConv",
    b"QLinearMatMul",
    b"MatMulInteger",
    b"ConvInteger",
)


@dataclass(frozen=True)
class GoldenSet:
    """The device's golden set: float32 inputs, integer labels, optional slices and reference."""

    path: Path
    inputs: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    slices: npt.NDArray[Any] | None
    reference: npt.NDArray[np.float32] | None
    sha256: str
    # detection: one ImageBoxes per row (ground truth), the category names in class order,
    # and detection.yaml's decode settings for model files without a package
    boxes: tuple[ImageBoxes, ...] | None = None
    class_names: tuple[str, ...] = ()
    detection: dict[str, Any] | None = None
    # raw-frame sets: one frame per row (``inputs`` is then an empty [N, 0] placeholder:
    # each model's preprocessing makes its own inputs) and preprocess.yaml's settings
    frames: tuple[npt.NDArray[Any], ...] | None = None
    preprocess: dict[str, Any] | None = None

    @property
    def rows(self) -> int:
        return len(self.inputs)

    @property
    def form(self) -> str:
        """The set's form: frames (raw, preprocessed per model) or tensors (model inputs)."""
        return "frames" if self.frames is not None else "tensors"

    @property
    def task(self) -> str:
        if self.boxes is not None:
            return "detection"
        return "segmentation" if self.labels.ndim == 3 else "classification"

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "rows": self.rows,
            "input_shape": list(self.inputs.shape[1:]),
            "task": self.task,
            "slices": self.slices is not None,
            "reference": self.reference is not None,
            "sha256": self.sha256,
            "form": self.form,
            **({"frame_shape": self._frame_shape()} if self.frames is not None else {}),
        }

    def _frame_shape(self) -> list[int] | str:
        assert self.frames is not None
        shapes = {f.shape for f in self.frames}
        return list(shapes.pop()) if len(shapes) == 1 else "mixed"


def _golden_digest(file_sha256s: dict[str, str]) -> str:
    """One hash over the golden files that exist (name and sha256), for the baseline cache;
    a frames/ folder's files count in name order."""
    digest = hashlib.sha256()
    names = [n for n in GOLDEN_FILES if n in file_sha256s]
    names += sorted(n for n in file_sha256s if n.startswith(f"{FRAMES_DIR}/"))
    for name in names:
        digest.update(name.encode() + b"\0" + file_sha256s[name].encode() + b"\n")
    return digest.hexdigest()


def golden_set_sha256(golden_dir: Path) -> str:
    """The golden set's hash (as GoldenSet.sha256) computed from the files on disk."""
    hashes = {
        name: file_sha256(golden_dir / name)
        for name in GOLDEN_FILES
        if (golden_dir / name).is_file()
    }
    if (golden_dir / FRAMES_DIR).is_dir() and not (golden_dir / FRAMES_NAME).exists():
        folder = golden_dir / FRAMES_DIR
        hashes.update(
            (f"{FRAMES_DIR}/{name}", file_sha256(folder / name))
            for name in frame_file_names(folder)
        )
    return _golden_digest(hashes)


NPY_MAGIC = b"\x93NUMPY"
# The header np.save writes (keys sorted, shape a tuple); anything else, including
# structured dtypes, goes through numpy's own parser (ast.literal_eval, ~100 µs cold).
_NPY_PLAIN_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n",
    re.ASCII,
)


def _npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """(shape, fortran_order, dtype) of an .npy file whose header np.save wrote; the file
    position is left after the header. None for header versions other than 1.0 and 2.0."""
    prefix = fh.read(10)
    if len(prefix) < 10 or prefix[:6] != NPY_MAGIC:
        raise ValueError("the file does not start with the .npy magic string")
    version = (prefix[6], prefix[7])
    if version == (1, 0):
        length = int.from_bytes(prefix[8:10], "little")
    elif version == (2, 0):
        more = fh.read(2)
        length = int.from_bytes(prefix[8:10] + more, "little")
    else:
        return None
    raw = fh.read(length)
    if len(raw) != length:
        raise ValueError("the .npy header is cut short")
    plain = _NPY_PLAIN_HEADER.fullmatch(raw.decode("latin1"))
    if plain is not None:
        dims = tuple(int(v) for v in plain.group(3).split(",") if v.strip())
        return dims, plain.group(2) == "True", np.dtype(plain.group(1))
    fh.seek(0)
    np.lib.format.read_magic(fh)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = reader(fh)
    return tuple(shape), bool(fortran_order), dtype


def read_npy_hashed(
    path: Path, max_bytes: int = GOLDEN_FILE_MAX_BYTES
) -> tuple[npt.NDArray[Any], str]:
    """Load an .npy array (no pickles) and the sha256 of the file, reading its bytes once:
    the header is parsed, the data is read straight into the array and hashed from there."""
    with open_regular(path, "file", GoldenSetError) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise GoldenSetError(f"{path}: {size} bytes is more than the {max_bytes} allowed")
        try:
            header = _npy_header(fh)
        except (ValueError, TypeError, SyntaxError, OSError, EOFError) as exc:
            raise GoldenSetError(f"{path}: not a plain .npy array ({exc})") from None
        if header is None:
            # A newer .npy header version: numpy's own reader, and the file read again.
            return load_npy(path, max_bytes), file_sha256(path)
        shape, fortran_order, dtype = header
        if dtype.hasobject:
            raise GoldenSetError(f"{path}: .npy holds Python objects (pickles are refused)")
        header_bytes = fh.tell()
        data = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
        if header_bytes + data.nbytes > size or fh.readinto(data.data) != data.nbytes:
            raise GoldenSetError(
                f"{path}: truncated .npy ({size} bytes, the header promises "
                f"{header_bytes + data.nbytes})"
            )
        fh.seek(0)
        digest = hashlib.sha256(fh.read(header_bytes))
        digest.update(data.data)
        fh.seek(header_bytes + data.nbytes)
        # np.load ignores bytes after the array; the hash covers them like file_sha256.
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    arr = data.view(dtype).reshape(shape, order="F" if fortran_order else "C")
    return arr, digest.hexdigest()


def load_golden_set(golden_dir: Path) -> GoldenSet:
    """Load and check a golden set folder; every problem is a GoldenSetError naming the file.

    Each file is read once: the same bytes give the arrays and the golden set's hash."""
    if not golden_dir.is_dir():
        raise GoldenSetError(f"{golden_dir}: golden set folder not found")
    inputs_path = golden_dir / "inputs.npy"
    labels_path = golden_dir / "labels.npy"
    annotations_path = golden_dir / ANNOTATIONS_NAME
    detection = annotations_path.is_file()
    if (golden_dir / FRAMES_NAME).exists() or (golden_dir / FRAMES_DIR).is_dir():
        if inputs_path.exists():
            raise GoldenSetError(
                f"{golden_dir}: holds both inputs.npy (tensors) and raw frames "
                f"({FRAMES_NAME} or {FRAMES_DIR}/); keep one form per golden set"
            )
        if detection:
            raise GoldenSetError(
                f"{golden_dir}: raw-frame golden sets are for classifiers; a detection "
                f"golden set holds inputs.npy tensors with {ANNOTATIONS_NAME}"
            )
        return load_frame_set(golden_dir)
    for required in (inputs_path,) if detection else (inputs_path, labels_path):
        # exists(), not is_file(): a FIFO or folder in its place is refused by name below.
        if not required.exists():
            raise GoldenSetError(
                f"{required}: missing (a golden set needs inputs.npy and labels.npy, "
                f"or inputs.npy and {ANNOTATIONS_NAME} for detection)"
            )
    hashes: dict[str, str] = {}
    inputs, hashes["inputs.npy"] = read_npy_hashed(inputs_path)
    if detection:
        labels = np.zeros(len(inputs), dtype=np.int64)
    else:
        labels, hashes["labels.npy"] = read_npy_hashed(labels_path)
    _check_inputs(inputs_path, inputs)
    _check_labels(labels_path, labels, len(inputs), detection)
    slices, reference = _slices_and_reference(golden_dir, len(inputs), hashes)
    boxes: tuple[ImageBoxes, ...] | None = None
    class_names: tuple[str, ...] = ()
    decode: dict[str, Any] | None = None
    if detection:
        boxes, class_names, hashes[ANNOTATIONS_NAME] = load_coco_annotations(
            annotations_path, len(inputs)
        )
        decode = _detection_settings(golden_dir / DETECTION_SPEC_NAME)
    return GoldenSet(
        path=golden_dir,
        inputs=inputs,
        labels=labels.astype(np.int64, copy=False),
        slices=slices,
        reference=reference,
        sha256=_golden_digest(hashes),
        boxes=boxes,
        class_names=class_names,
        detection=decode,
    )


def _check_inputs(inputs_path: Path, inputs: npt.NDArray[Any]) -> None:
    """inputs.npy: finite float32 rows ``[N, ...]``, at least one."""
    if inputs.dtype != np.float32:
        raise GoldenSetError(
            f"{inputs_path}: dtype {inputs.dtype}, expected float32 in the model's float domain"
        )
    if inputs.ndim < 2:
        raise GoldenSetError(f"{inputs_path}: shape {inputs.shape}, expected [N, ...] rows")
    if len(inputs) == 0:
        raise GoldenSetError(f"{inputs_path}: the golden set is empty")
    if not np.isfinite(inputs).all():
        row = int(np.argwhere(~np.isfinite(inputs))[0][0])
        raise GoldenSetError(f"{inputs_path}: NaN or infinite value (first in row {row})")


def _check_labels(labels_path: Path, labels: npt.NDArray[Any], rows: int, detection: bool) -> None:
    """labels.npy: one non-negative integer class id or mask per input row."""
    if not detection and labels.dtype.kind not in "iu":
        raise GoldenSetError(f"{labels_path}: dtype {labels.dtype}, expected integer class ids")
    if labels.ndim not in (1, 3):
        raise GoldenSetError(
            f"{labels_path}: shape {labels.shape}, expected [N] class ids or [N,H,W] masks"
        )
    if len(labels) != rows:
        raise GoldenSetError(
            f"{labels_path}: {len(labels)} labels for {rows} inputs (lengths differ)"
        )
    if labels.min() < 0:
        raise GoldenSetError(f"{labels_path}: negative label {int(labels.min())}")


def _slices_and_reference(
    golden_dir: Path, rows: int, hashes: dict[str, str]
) -> tuple[npt.NDArray[Any] | None, npt.NDArray[np.float32] | None]:
    """The optional slices.npy (a slice id per row) and reference.npy (trusted outputs)."""
    slices = _optional(golden_dir / "slices.npy", rows, hashes)
    if slices is not None and (slices.ndim != 1 or slices.dtype.kind not in "iuU"):
        raise GoldenSetError(
            f"{golden_dir / 'slices.npy'}: expected one integer or string id per row, "
            f"got dtype {slices.dtype} shape {slices.shape}"
        )
    reference = _optional(golden_dir / "reference.npy", rows, hashes)
    if reference is None:
        return slices, None
    if reference.dtype.kind != "f" or not np.isfinite(reference).all():
        raise GoldenSetError(
            f"{golden_dir / 'reference.npy'}: expected finite float outputs, one row per input"
        )
    return slices, reference.astype(np.float32)


def _check_frame(frame: npt.NDArray[Any], where: str) -> npt.NDArray[Any]:
    """One raw frame as the daemon's sources deliver it: HxW or HxWxC (1, 3 or 4 channels),
    numeric and finite."""
    if frame.ndim not in (2, 3) or frame.size == 0:
        raise GoldenSetError(f"{where}: a frame must be HxW or HxWxC, got shape {frame.shape}")
    if frame.ndim == 3 and frame.shape[2] not in (1, 3, 4):
        raise GoldenSetError(f"{where}: {frame.shape[2]} channels (a frame has 1, 3 or 4)")
    if frame.dtype.kind not in "uif":
        raise GoldenSetError(f"{where}: a frame must be numeric, got dtype {frame.dtype}")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise GoldenSetError(f"{where}: NaN or infinite pixel")
    return frame


def _read_frames(golden_dir: Path, hashes: dict[str, str]) -> tuple[npt.NDArray[Any], ...]:
    """frames.npy [N,H,W(,C)] or the files of frames/ in name order, one frame each."""
    one_array = golden_dir / FRAMES_NAME
    if one_array.exists():
        arr, hashes[FRAMES_NAME] = read_npy_hashed(one_array)
        if arr.ndim not in (3, 4):
            raise GoldenSetError(
                f"{one_array}: shape {arr.shape}, expected [N, H, W] or [N, H, W, C] frames"
            )
        if len(arr) == 0:
            raise GoldenSetError(f"{one_array}: the golden set is empty")
        for i in range(len(arr)):
            _check_frame(arr[i], f"{one_array}: frame {i}")
        return tuple(arr[i] for i in range(len(arr)))
    from agent.errors import EdgeAgentError
    from agent.pipeline.sources import read_image_file

    folder = golden_dir / FRAMES_DIR
    names = frame_file_names(folder)
    if not names:
        raise GoldenSetError(f"{folder}: no .npy or image files (the golden set is empty)")
    frames = []
    for name in names:
        path = folder / name
        try:
            frame = np.asarray(read_image_file(path))
        except EdgeAgentError as exc:
            # the daemon's own reader: OpenCV for images, safe .npy loading for arrays
            raise GoldenSetError(f"{path}: cannot read the frame ({exc})") from None
        frames.append(_check_frame(frame, str(path)))
        hashes[f"{FRAMES_DIR}/{name}"] = file_sha256(path)
    return tuple(frames)


def frame_file_names(folder: Path) -> list[str]:
    """The frame files of a frames/ folder in row order: .npy and images, by name (the
    suffixes a directory source reads)."""
    from agent.pipeline.sources import IMAGE_SUFFIXES, NPY_SUFFIXES

    return sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix.lower() in NPY_SUFFIXES + IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def load_frame_set(golden_dir: Path) -> GoldenSet:
    """A raw-frame golden set: frames, integer labels [N], optional slices, reference and
    preprocess.yaml (for bare model files). Each problem is a GoldenSetError naming it."""
    hashes: dict[str, str] = {}
    frames = _read_frames(golden_dir, hashes)
    labels_path = golden_dir / "labels.npy"
    if not labels_path.exists():
        raise GoldenSetError(f"{labels_path}: missing (a raw-frame golden set needs labels)")
    labels, hashes["labels.npy"] = read_npy_hashed(labels_path)
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise GoldenSetError(
            f"{labels_path}: dtype {labels.dtype} shape {labels.shape}, expected integer "
            "class ids [N] (raw frames are for classifiers)"
        )
    if len(labels) != len(frames):
        raise GoldenSetError(
            f"{labels_path}: {len(labels)} labels for {len(frames)} frames (lengths differ)"
        )
    if len(labels) and labels.min() < 0:
        raise GoldenSetError(f"{labels_path}: negative label {int(labels.min())}")
    slices = _optional(golden_dir / "slices.npy", len(frames), hashes)
    if slices is not None and (slices.ndim != 1 or slices.dtype.kind not in "iuU"):
        raise GoldenSetError(
            f"{golden_dir / 'slices.npy'}: expected one integer or string id per row, "
            f"got dtype {slices.dtype} shape {slices.shape}"
        )
    reference = _optional(golden_dir / "reference.npy", len(frames), hashes)
    if reference is not None:
        if reference.dtype.kind != "f" or not np.isfinite(reference).all():
            raise GoldenSetError(
                f"{golden_dir / 'reference.npy'}: expected finite float outputs, one row per frame"
            )
        reference = reference.astype(np.float32)
    preprocess = None
    pre_path = golden_dir / PREPROCESS_NAME
    if pre_path.is_file():
        preprocess = _yaml_mapping(pre_path, "resize, layout, color_order, mean, std, scale")
        hashes[PREPROCESS_NAME] = file_sha256(pre_path)
    return GoldenSet(
        path=golden_dir,
        inputs=np.zeros((len(frames), 0), dtype=np.float32),
        labels=labels.astype(np.int64, copy=False),
        slices=slices,
        reference=reference,
        sha256=_golden_digest(hashes),
        frames=frames,
        preprocess=preprocess,
    )


def _yaml_mapping(path: Path, keys: str) -> dict[str, Any]:
    from agent.config import load_yaml_file

    try:
        data = load_yaml_file(path)
    except ConfigError as exc:
        raise GoldenSetError(str(exc)) from None
    if not isinstance(data, dict):
        raise GoldenSetError(f"{path}: expected a mapping ({keys})")
    return dict(data)


_SETTINGS_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _detection_settings(path: Path) -> dict[str, Any] | None:
    """detection.yaml, parsed once per file version (the pure-Python YAML parser is slow)."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _SETTINGS_CACHE:
        return dict(_SETTINGS_CACHE[key])
    from agent.config import load_yaml_file

    try:
        data = load_yaml_file(path)
    except ConfigError as exc:
        raise GoldenSetError(str(exc)) from None
    if not isinstance(data, dict):
        raise GoldenSetError(f"{path}: expected a mapping (layout, score_threshold, ...)")
    _SETTINGS_CACHE[key] = dict(data)
    return data


def _coco_fail(path: Path, where: str, problem: str) -> GoldenSetError:
    return GoldenSetError(f"{path}: {where}: {problem}")


def load_coco_annotations(
    path: Path, rows: int
) -> tuple[tuple[ImageBoxes, ...], tuple[str, ...], str]:
    """Ground-truth boxes from a COCO JSON file: ``images`` in row order (the i-th image is
    inputs row i), ``categories`` in class order (the i-th category is model class i),
    ``annotations`` with ``bbox`` [x, y, width, height] in input pixels. Returns one
    ImageBoxes (xyxy) per row, the category names and the file's sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GoldenSetError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > ANNOTATIONS_MAX_BYTES:
        raise GoldenSetError(f"{path}: {len(raw)} bytes is more than {ANNOTATIONS_MAX_BYTES}")
    digest = hashlib.sha256(raw).hexdigest()
    # The OTA client gates often on the same file: parse and check it once per content.
    cached = _ANNOTATIONS_CACHE.get((digest, rows))
    if cached is not None:
        return cached
    boxes, names = _parse_coco(path, raw, rows)
    result = (boxes, names, digest)
    _ANNOTATIONS_CACHE.clear()
    _ANNOTATIONS_CACHE[(digest, rows)] = result
    return result


_ANNOTATIONS_CACHE: dict[tuple[str, int], tuple[tuple[ImageBoxes, ...], tuple[str, ...], str]] = {}


def _parse_coco(
    path: Path, raw: bytes, rows: int
) -> tuple[tuple[ImageBoxes, ...], tuple[str, ...]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise GoldenSetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GoldenSetError(f"{path}: expected a COCO object (images, annotations, categories)")
    images, anns, cats = (data.get(k) for k in ("images", "annotations", "categories"))
    for key, value in (("images", images), ("annotations", anns), ("categories", cats)):
        if not isinstance(value, list):
            raise _coco_fail(path, key, "missing or not a list")
    assert isinstance(images, list) and isinstance(anns, list) and isinstance(cats, list)
    if len(images) != rows:
        raise _coco_fail(path, "images", f"{len(images)} images for {rows} inputs (lengths differ)")
    if not cats:
        raise _coco_fail(path, "categories", "empty (at least one class)")
    row_of: dict[Any, int] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or isinstance(img.get("id"), bool) or "id" not in img:
            raise _coco_fail(path, f"images[{i}]", "expected an object with an id")
        if img["id"] in row_of:
            raise _coco_fail(path, f"images[{i}].id", f"duplicate id {img['id']!r}")
        row_of[img["id"]] = i
    class_of: dict[Any, int] = {}
    names: list[str] = []
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat:
            raise _coco_fail(path, f"categories[{i}]", "expected an object with an id")
        if cat["id"] in class_of:
            raise _coco_fail(path, f"categories[{i}].id", f"duplicate id {cat['id']!r}")
        class_of[cat["id"]] = i
        names.append(str(cat.get("name", cat["id"])))
    per_row: list[list[tuple[list[float], int]]] = [[] for _ in range(rows)]
    for i, ann in enumerate(anns):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise _coco_fail(path, where, "expected an object")
        if ann.get("image_id") not in row_of:
            raise _coco_fail(path, f"{where}.image_id", f"no image {ann.get('image_id')!r}")
        if ann.get("category_id") not in class_of:
            raise _coco_fail(
                path, f"{where}.category_id", f"no category {ann.get('category_id')!r}"
            )
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)
            or bbox[2] <= 0
            or bbox[3] <= 0
        ):
            raise _coco_fail(path, f"{where}.bbox", "expected [x, y, width, height], sizes > 0")
        if ann.get("iscrowd"):
            raise _coco_fail(path, f"{where}.iscrowd", "crowd regions are not supported")
        x, y, w, h = (float(v) for v in bbox)
        per_row[row_of[ann["image_id"]]].append(
            ([x, y, x + w, y + h], class_of[ann["category_id"]])
        )
    boxes = tuple(
        ImageBoxes(
            np.asarray([b for b, _ in items], dtype=np.float64).reshape(-1, 4),
            np.asarray([c for _, c in items], dtype=np.int64),
        )
        for items in per_row
    )
    return boxes, tuple(names)


def _optional(path: Path, rows: int, hashes: dict[str, str]) -> npt.NDArray[Any] | None:
    if not path.exists():
        return None
    arr, hashes[path.name] = read_npy_hashed(path)
    if len(arr) != rows:
        raise GoldenSetError(f"{path}: {len(arr)} rows for {rows} inputs (lengths differ)")
    return arr


def check_labels_fit(golden: GoldenSet, num_classes: int) -> None:
    """Refuse labels that the model's output cannot name (class id >= number of outputs)."""
    labels = golden.labels
    if golden.task == "segmentation":
        labels = labels[labels != SEGMENTATION_IGNORE]
    top = int(labels.max()) if labels.size else 0
    if top >= num_classes:
        raise GoldenSetError(
            f"{golden.path / 'labels.npy'}: label {top} is out of range for a model "
            f"with {num_classes} classes"
        )


@dataclass(frozen=True)
class GateModel:
    """A model to gate: its file, how to run it, and what its package says about it."""

    model_path: Path
    backend: str
    precision: str
    manifest: dict[str, Any] | None
    # The model file's sha256 when resolving it already read the file (None: not yet).
    sha256: str | None = None
    # the installed package folder holding the model (None: a bare model file)
    package_dir: Path | None = None

    @property
    def package_gate(self) -> dict[str, Any] | None:
        gate = (self.manifest or {}).get("gate")
        return dict(gate) if isinstance(gate, dict) else None

    @property
    def labels(self) -> list[str] | None:
        labels = (self.manifest or {}).get("labels")
        return [str(v) for v in labels] if isinstance(labels, list) else None

    @property
    def label(self) -> str:
        if self.manifest:
            return f"{self.manifest.get('name', '?')}-{self.manifest.get('version', '?')}"
        return self.model_path.name


def _read_manifest(package_dir: Path) -> dict[str, Any]:
    """The installed package's manifest as plain data, validated by agent.package when the
    package part is present (it is optional here so the gate stands alone)."""
    try:
        from agent.package import load_installed
    except ImportError:  # pragma: no cover - only on a partial install
        load_installed = None  # type: ignore[assignment]
    if load_installed is not None and (package_dir / "manifest.json").is_file():
        return load_installed(package_dir).to_dict()
    # Plain JSON: the package was verified when it was installed, this only reads it back.
    path = package_dir / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{package_dir}: neither a model file nor a package (no manifest.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the manifest is not a JSON object")
    return data


def package_beside(model_path: Path, levels: int = 8) -> tuple[dict[str, Any], Path] | None:
    """(manifest, folder) of the installed package holding ``model_path``, or None."""
    manifest = manifest_beside(model_path, levels)
    if manifest is None:
        return None
    target = model_path.resolve()
    model = str(manifest["runtime"]["model"])
    for folder in list(target.parents)[:levels]:
        if (folder / model).resolve() == target:
            return manifest, folder
    return None


def manifest_beside(model_path: Path, levels: int = 8) -> dict[str, Any] | None:
    """The manifest of the installed package holding ``model_path`` (a loaded backend's
    file), or None for a bare model file. Plain JSON: the package was verified at install."""
    target = model_path.resolve()
    for folder in list(target.parents)[:levels]:
        path = folder / "manifest.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        runtime = data.get("runtime") if isinstance(data, dict) else None
        model = runtime.get("model") if isinstance(runtime, dict) else None
        if isinstance(model, str) and (folder / model).resolve() == target:
            return dict(data)
        return None
    return None


def scan_model_file(
    path: Path, chunk_bytes: int = 1 << 20, onnx: bool | None = None
) -> tuple[str, str]:
    """(sha256, precision) of a model file from one streaming read: precision is 'int8'
    when an ONNX graph holds quantized operators, 'fp32' when it holds none, and 'unknown'
    for other formats (the loaded model's tensor specs decide, see golden.run_gate).
    ``onnx`` None: an ONNX graph is a file named .onnx."""
    is_onnx = path.suffix.lower() == ".onnx" if onnx is None else onnx
    overlap = max(len(m) for m in ONNX_INT8_MARKERS) - 1
    digest = hashlib.sha256()
    quantized = False
    tail = b""
    try:
        with open_regular(path, "model file", ModelError) as fh:
            while chunk := fh.read(chunk_bytes):
                digest.update(chunk)
                if is_onnx and not quantized:
                    # The tail of the previous chunk finds a marker cut by the boundary.
                    window = tail + chunk
                    quantized = any(marker in window for marker in ONNX_INT8_MARKERS)
                    tail = window[-overlap:]
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    precision = ("int8" if quantized else "fp32") if is_onnx else "unknown"
    return digest.hexdigest(), precision


def onnx_precision(path: Path) -> str:
    """'int8' when the ONNX graph holds quantized operators, else 'fp32'."""
    return scan_model_file(path, onnx=True)[1]


def resolve_model(source: Path, backend: str = "auto") -> GateModel:
    """A model file or an installed package directory, as something the gate can load."""
    if source.is_dir():
        manifest = _read_manifest(source)
        runtime = manifest.get("runtime")
        if not isinstance(runtime, dict) or not isinstance(runtime.get("model"), str):
            raise ModelError(f"{source / 'manifest.json'}: runtime.model is missing")
        model_path = (source / runtime["model"]).resolve()
        if source.resolve() not in model_path.parents:
            raise ModelError(f"{source / 'manifest.json'}: runtime.model leaves the package")
        if not model_path.exists():
            raise ModelError(f"{model_path}: model file named by the manifest is missing")
        kind = str(runtime.get("kind", ""))
        chosen = backend if backend != "auto" else RUNTIME_TO_BACKEND.get(kind, "auto")
        sha256, scanned = scan_model_file(model_path)
        precision = str(runtime.get("precision") or scanned)
        return GateModel(model_path, chosen, precision, manifest, sha256, source)
    if not source.exists():
        raise ModelError(f"{source}: model file or package directory not found")
    # A FIFO, device or socket is refused by name (scan_model_file opens nothing else).
    sha256, precision = scan_model_file(source)
    return GateModel(source, backend, precision, None, sha256)


# What run_gate takes for a model: a loaded backend, or a model file or package folder.
ModelSource = Backend | Path | str


def as_gate_model(source: ModelSource, backend: str) -> tuple[GateModel, Backend | None]:
    """A gate model from a loaded backend (it runs as loaded) or a path (resolve_model)."""
    if isinstance(source, Backend):
        sha256, precision = scan_model_file(source.path, onnx=source.name == "onnx")
        # a loaded package model: its manifest names the output layout (detection) and
        # the preprocessing raw golden frames go through
        found = package_beside(Path(source.path))
        manifest, folder = found if found is not None else (None, None)
        return GateModel(source.path, source.name, precision, manifest, sha256, folder), source
    return resolve_model(Path(source), backend), None
