"""The gate's fast paths give what the plain ones gave: one-read golden files, the timed pass,
percentiles, RSS from /proc, and a bounded baseline cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from demo_models import DIGITS_SHAPE, OPSET
from onnx import TensorProto, helper, numpy_helper

from agent.errors import GoldenSetError, ModelError
from agent.ota.gate_cache import TORN_ENTRY_AGE_S, BaselineCache
from agent.ota.gate_data import (
    golden_set_sha256,
    load_golden_set,
    read_npy_hashed,
    scan_model_file,
)
from agent.ota.gate_measure import current_rss_bytes, latency_summaries_ms
from agent.ota.golden import run_gate
from agent.runtime.base import file_sha256


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=">f4").reshape(3, 4)),
        np.array(["bold", "thin", "dim"]),
        np.zeros((0, 5), dtype=np.int64),
        np.float64(2.5),
        np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),  # numpy's own header parser
    ],
    ids=["c-order", "fortran-big-endian", "strings", "empty", "scalar", "structured"],
)
def test_read_npy_hashed_matches_np_load_and_file_sha256(tmp_path: Path, arr: np.ndarray):
    path = tmp_path / "a.npy"
    np.save(path, arr, allow_pickle=False)
    got, digest = read_npy_hashed(path)
    want = np.load(path, allow_pickle=False)
    assert digest == file_sha256(path)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_read_npy_hashed_reads_every_header_version(tmp_path: Path, version: tuple[int, int]):
    path = tmp_path / "a.npy"
    with path.open("wb") as fh:
        np.lib.format.write_array(fh, np.arange(6.0).reshape(2, 3), version=version)
    got, digest = read_npy_hashed(path)
    assert digest == file_sha256(path)
    np.testing.assert_array_equal(got, np.arange(6.0).reshape(2, 3))


def test_read_npy_hashed_hashes_trailing_bytes_like_the_file_hash(tmp_path: Path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones(4, dtype=np.float32))
    with path.open("ab") as fh:
        fh.write(b"trailing")
    got, digest = read_npy_hashed(path)
    assert digest == file_sha256(path)
    np.testing.assert_array_equal(got, np.ones(4, dtype=np.float32))


def test_golden_set_hash_is_unchanged_by_the_single_read(golden_dir: Path):
    # Cache entries written before the single-read loader must still be found.
    assert load_golden_set(golden_dir).sha256 == golden_set_sha256(golden_dir)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated .npy"),
        (lambda p: p.write_bytes(b"not an npy file at all"), "not a plain .npy array"),
        (
            lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': nope}\n"),
            "not a plain .npy array",
        ),
        (
            lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
            "pickles are refused",
        ),
    ],
    ids=["truncated", "garbage", "bad-header", "pickled"],
)
def test_broken_golden_file_is_a_one_line_error(make_golden, write, message: str):
    folder = make_golden()
    write(folder / "inputs.npy")
    with pytest.raises(GoldenSetError, match=message) as info:
        load_golden_set(folder)
    assert info.value.exit_code == 2
    assert "inputs.npy" in str(info.value) and "\n" not in str(info.value)


def test_latency_summaries_match_np_percentile():
    rng = np.random.default_rng(5)
    for rows in (1, 2, 19, 480, 1001):
        lat = rng.gamma(2.0, 1e-4, rows)
        (got,) = latency_summaries_ms(lat)
        p50, p95, p99 = np.percentile(lat * 1000.0, [50, 95, 99])
        assert got["p50_ms"] == pytest.approx(p50, rel=1e-12)
        assert got["p95_ms"] == pytest.approx(p95, rel=1e-12)
        assert got["p99_ms"] == pytest.approx(p99, rel=1e-12)
        assert got["mean_ms"] == pytest.approx(lat.mean() * 1000.0, rel=1e-12)


def test_rss_from_proc_follows_allocations_like_psutil():
    before = current_rss_bytes()
    assert abs(before - psutil.Process().memory_info().rss) < 8 << 20
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    grown = current_rss_bytes() - before
    assert 56 << 20 < grown < 96 << 20
    del block


def _ragged_output_model(path: Path) -> Path:
    """Outputs [1, k] where k is how many pixels of the row are bright: a model whose output
    size changes from row to row (the gate must refuse it, not misread it)."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
            helper.make_node("Reshape", ["input", "row_shape"], ["row"]),
            helper.make_node("Greater", ["row", "half"], ["bright"]),
            helper.make_node("Compress", ["flat", "bright"], ["logits"], axis=1),
        ],
        "ragged",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *DIGITS_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "K"])],
        [
            numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([64], dtype=np.int64), "row_shape"),
            numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def test_output_size_changing_between_rows_is_refused(tmp_path: Path, golden_dir: Path):
    ragged = _ragged_output_model(tmp_path / "ragged.onnx")
    with pytest.raises(ModelError, match="output shape changed between rows") as info:
        run_gate(ragged, ragged, golden_dir)
    assert info.value.exit_code == 2


def test_both_models_get_one_latency_and_output_per_row(demo_models: Path, golden_dir: Path):
    report = run_gate(
        demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", golden_dir
    )
    rows = report.golden["rows"]
    for role in ("baseline", "candidate"):
        assert report.metrics[role]["rows"] == rows
        assert sum(map(sum, report.metrics[role]["confusion_matrix"])) == rows
        lat = report.metrics["latency"][role]
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]


def _store(cache: BaselineCache, n: int) -> Path:
    return cache.store(
        f"{n:064x}", "g" * 64, "onnx|test|cpu", np.zeros((3, 2)), np.ones(3) * 1e-3, 0
    )


def test_cache_keeps_the_most_recently_used_entries(tmp_path: Path):
    cache = BaselineCache(tmp_path / "cache", max_entries=3)
    # Explicit times in the past: file times are too coarse to order quick stores.
    past = time.time() - 1000

    def store_at(n: int) -> Path:
        entry = _store(cache, n)
        os.utime(entry / "meta.json", (past + n, past + n))
        return entry

    running = store_at(0)
    for n in (1, 2):
        store_at(n)
    # Gate after gate with the same running model and a refused candidate each time: the
    # running model's entry is used every time, so it stays while older candidates go.
    for n in range(3, 7):
        assert cache.load(f"{0:064x}", "g" * 64, "onnx|test|cpu", 3) is not None
        store_at(n)
    left = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(left) == 3 and running.name in left
    for gone in range(1, 5):
        assert cache.load(f"{gone:064x}", "g" * 64, "onnx|test|cpu", 3) is None
    assert cache.load(f"{6:064x}", "g" * 64, "onnx|test|cpu", 3) is not None


def test_cache_removes_old_torn_entries_only(tmp_path: Path):
    cache = BaselineCache(tmp_path / "cache")
    torn_old = tmp_path / "cache" / "torn-old"
    torn_new = tmp_path / "cache" / "torn-new"
    for folder in (torn_old, torn_new):
        folder.mkdir(parents=True)
        (folder / "outputs.npy").write_bytes(b"half written")
    stale = time.time() - TORN_ENTRY_AGE_S - 60
    os.utime(torn_old, (stale, stale))
    kept = _store(cache, 1)
    assert not torn_old.exists()
    assert torn_new.exists() and kept.exists()


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1000, 1 << 20])
def test_model_scan_gives_hash_and_precision_in_one_read(demo_models: Path, chunk_bytes: int):
    # Small chunks cut the quantized-operator names across reads; they must still be found.
    for name, precision in (("digits_int8.onnx", "int8"), ("digits_fp32.onnx", "fp32")):
        path = demo_models / name
        assert scan_model_file(path, chunk_bytes) == (file_sha256(path), precision)
    tflite = demo_models / "digits_int8.tflite"
    assert scan_model_file(tflite, chunk_bytes) == (file_sha256(tflite), "unknown")
