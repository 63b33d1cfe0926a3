"""pii_fields end to end: a directory source's sidecar metadata and file names, through the
real daemon, into telemetry.db and the OTLP upload body, masked wherever they sit."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.cli import main
from agent.config import load_config
from agent.daemon import Daemon
from agent.telemetry.sampler import MASKED

PII_FIELDS = ["plate", "camera.owner", "face_id", "source.path", "message", "ssn"]
# what the camera's integrator wrote beside each frame (the source controls all of it)
SIDECARS = {
    "0001-plate-AB123.npy": {
        "plate": "AB-123",
        "camera": {"owner": "Alice Example", "id": 3},
        "people": [{"face_id": "F-77", "seat": 1}, {"face_id": "F-78", "seat": 2}],
        "lane": 2,
    },
    "0002.npy": {"roi": {"PLATE": "CD-456", "x": 4}, "Plate": "EF-789"},
}
# five channels for an RGB model: the daemon skips it with an error event whose message
# names the file
BAD_FRAME = "0003-plate-XY999.npy"


def rgb_model(tmp: Path) -> Path:
    """A real ONNX model on 8x8 RGB frames (the mean of each channel as its logits)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["input"], ["logits"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph(
        [node],
        "rgb_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / "rgb_mean.onnx"
    onnx.save_model(model, str(path))
    return path


class BodyReceiver:
    """A plain HTTP server on 127.0.0.1 keeping every request body as the collector gets it."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                receiver.bodies.append(raw.decode("utf-8"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass(frozen=True)
class Seen:
    samples: list[dict[str, Any]]
    events: list[tuple[str, dict[str, Any]]]
    stored: str  # every attrs column of telemetry.db
    body: str  # every upload request body


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seen]:
    tmp = tmp_path_factory.mktemp("pii")
    frames = tmp / "frames"
    frames.mkdir()
    for name, sidecar in SIDECARS.items():
        np.save(frames / name, np.full((8, 8, 3), (200, 100, 50), np.uint8))
        (frames / name).with_suffix(".json").write_text(json.dumps(sidecar))
    np.save(frames / BAD_FRAME, np.zeros((8, 8, 5), np.uint8))
    state = tmp / "st"
    config = {
        "state_dir": str(state),
        "device_id": "dev-pii",
        "model": {"path": str(rgb_model(tmp)), "warmup_runs": 1, "labels": ["r", "g", "b"]},
        "preprocess": {"color_order": "RGB", "scale": 1 / 255, "top_k": 2},
        "source": {"kind": "directory", "path": str(frames)},
        "scheduler": {"fps_cap": 0, "drain_timeout_s": 2.0},
        "governor": {"enabled": False},
        "sinks": [],
        "telemetry": {"enabled": True, "sample_rate": 1.0, "pii_fields": PII_FIELDS},
        "status": {"interval_s": 0.2},
    }
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    assert Daemon(load_config(path), path).run() == 0  # the directory ends: a clean exit
    with sqlite3.connect(state / "telemetry.db") as conn:
        rows = conn.execute("SELECT type, name, attrs FROM records ORDER BY id").fetchall()
    samples = [json.loads(a) for t, _n, a in rows if t == "sample"]
    receiver = BodyReceiver()
    try:
        flush = ["telemetry", "flush", "--state-dir", str(state), "--endpoint", receiver.url]
        assert main(flush) == 0
    finally:
        receiver.close()
    yield Seen(
        samples=samples,
        events=[(n, json.loads(a)) for t, n, a in rows if t == "event"],
        stored="\n".join(a for _t, _n, a in rows),
        body="\n".join(receiver.bodies),
    )


def _sample(seen: Seen, frame: str) -> dict[str, Any]:
    # with source.path masked, the stored path is "<masked>": the samples are in frame order
    ordered = sorted(SIDECARS)
    masked = [s for s in seen.samples if s["frame_seq"] == ordered.index(frame) + 1]
    assert masked, f"no sample for {frame}: {seen.samples}"
    return masked[0]


@dataclasses.dataclass(frozen=True)
class PiiRow:
    """What the source controls (a sidecar key or a file name), where it lands in the
    record, and what must be stored there; ``secret`` must appear in neither the store nor
    the upload body (None: the value is kept)."""

    id: str
    frame: str
    where: tuple[Any, ...]
    expected: Any
    secret: str | None


ROWS = [
    PiiRow("top-level-meta-field", "0001-plate-AB123.npy", ("plate",), MASKED, "AB-123"),
    PiiRow(
        "nested-field-by-dotted-path",
        "0001-plate-AB123.npy",
        ("camera", "owner"),
        MASKED,
        "Alice Example",
    ),
    PiiRow("nested-sibling-kept", "0001-plate-AB123.npy", ("camera", "id"), 3, None),
    PiiRow("list-of-dicts", "0001-plate-AB123.npy", ("people", 1, "face_id"), MASKED, "F-78"),
    PiiRow("list-of-dicts-sibling-kept", "0001-plate-AB123.npy", ("people", 0, "seat"), 1, None),
    PiiRow("name-in-upper-case", "0002.npy", ("roi", "PLATE"), MASKED, "CD-456"),
    PiiRow("name-in-mixed-case", "0002.npy", ("Plate",), MASKED, "EF-789"),
    PiiRow("pii-field-absent-kept", "0001-plate-AB123.npy", ("lane",), 2, None),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_source_metadata_is_masked_in_the_store_and_the_upload(seen: Seen, row: PiiRow) -> None:
    value: Any = _sample(seen, row.frame)["source_meta"]
    for step in row.where:
        value = value[step]
    assert value == row.expected
    if row.secret is not None:
        assert row.secret not in seen.stored
        assert row.secret not in seen.body
    else:
        # a kept field reaches the collector too (as part of the attribute's JSON string)
        assert f'\\"{row.where[-1]}\\":{json.dumps(row.expected)}' in seen.body.replace(" ", "")


def test_source_path_is_masked_and_the_rest_of_the_record_kept(seen: Seen) -> None:
    """``source.path`` masks the frame's file name (here it names a plate), not the source."""
    record = _sample(seen, "0001-plate-AB123.npy")
    assert record["source"]["path"] == MASKED
    assert record["source"]["name"].startswith("directory:")
    assert "plate-AB123" not in seen.stored and "plate-AB123" not in seen.body
    # the record's own fields are there, the result is the one a sink line carries
    assert record["meta"] == {"model": "rgb_mean", "version": "local"}
    assert len(record["top"]) == 2 and {"class", "score", "label"} <= set(record["top"][0])
    assert record["top_class"] == record["top"][0]["class"]


def test_event_attributes_are_masked(seen: Seen) -> None:
    """The skipped five-channel frame's error event: ``message`` is listed, ``where`` is not."""
    errors = [attrs for name, attrs in seen.events if name == "error"]
    assert errors and errors[0]["where"] == "frame"
    assert all(attrs["message"] == MASKED for attrs in errors)
    assert "plate-XY999" not in seen.stored and "plate-XY999" not in seen.body
    assert "5 channels" not in seen.stored and "5 channels" not in seen.body
    starts = [attrs for name, attrs in seen.events if name == "daemon.start"]
    assert starts and starts[0]["model"] == "rgb_mean"  # not listed: kept


def test_every_frame_sampled_and_uploaded(seen: Seen) -> None:
    """The checks above are not vacuous: both good frames were stored and sent."""
    assert sorted(s["frame_seq"] for s in seen.samples) == [1, 2]
    assert seen.body.count('"inference.sample"') >= 2


@dataclasses.dataclass(frozen=True)
class SidecarRow:
    """What the source's writer put beside a frame, and the metadata the frame gets."""

    id: str
    sidecar: bytes | None
    meta: dict[str, Any] | None


SIDECAR_ROWS = [
    SidecarRow("object", b'{"plate": "AB-123", "lane": 2}', {"plate": "AB-123", "lane": 2}),
    SidecarRow("none", None, None),
    SidecarRow("not-json", b'{"plate": ', None),
    SidecarRow("a-list-not-an-object", b'[{"plate": "AB-123"}]', None),
    SidecarRow("over-64-KiB", b'{"x": "' + b"a" * (64 << 10) + b'"}', None),
]


@pytest.mark.parametrize("row", SIDECAR_ROWS, ids=[r.id for r in SIDECAR_ROWS])
def test_a_bad_sidecar_leaves_the_frame_without_metadata(tmp_path: Path, row: SidecarRow) -> None:
    from agent.pipeline.sources import DirectorySource

    np.save(tmp_path / "0001.npy", np.zeros((8, 8), np.uint8))
    if row.sidecar is not None:
        (tmp_path / "0001.json").write_bytes(row.sidecar)
    frame = DirectorySource(tmp_path).read(1.0)
    assert frame is not None and frame.data.shape == (8, 8)  # the frame itself is good
    assert frame.meta == row.meta
