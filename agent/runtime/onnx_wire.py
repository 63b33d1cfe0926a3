"""Finds ONNX tensors that point at external data by walking the protobuf wire format.

A model whose tensor says "my bytes are in another file" makes ONNX Runtime open that
file, so a package could read any file the agent can. The check must hold on the device,
where the `onnx` package is not installed (it is a dev dependency, and importing it costs
~20 MB of RSS), so it reads the few message types that can hold a tensor straight from
the wire format: no onnx import, no copy of the file (mmap).
"""

from __future__ import annotations

import mmap
from pathlib import Path

from agent.errors import ModelError

# Field numbers from onnx.proto3 (stable since IR version 3). Each message type lists the
# fields that can (transitively) hold a TensorProto, and which type they are.
_MODEL = {7: "graph", 20: "training", 25: "function"}
_TRAINING = {1: "graph", 2: "graph"}
_FUNCTION = {7: "node"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_SCHEMA = {
    "model": _MODEL,
    "training": _TRAINING,
    "function": _FUNCTION,
    "graph": _GRAPH,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
}
_TENSOR_NAME = 8
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1
# Subgraphs nest (If / Loop / Scan bodies); far deeper than any real model, shallow enough
# that a crafted file cannot exhaust the stack.
MAX_DEPTH = 64


class _WireError(ValueError):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start, end-or-varint-value) of each field in one message."""
    out = []
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            out.append((number, wire, value, value))
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            out.append((number, wire, pos, pos + length))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
            raise _WireError(f"wire type {wire}")
        if pos > end:
            raise _WireError("field runs past its message")
    return out


def _external_in(buf: memoryview, kind: str, start: int, end: int, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        raise _WireError(f"messages nested deeper than {MAX_DEPTH}")
    fields = _fields(buf, start, end)
    if kind == "tensor":
        external = any(
            (number == _TENSOR_EXTERNAL_DATA and wire == 2)
            or (number == _TENSOR_DATA_LOCATION and wire == 0 and value == _EXTERNAL)
            for number, wire, _, value in fields
        )
        if not external:
            return None
        names = [(s, e) for n, w, s, e in fields if n == _TENSOR_NAME and w == 2]
        if not names:
            return "(unnamed tensor)"
        s, e = names[-1]
        return bytes(buf[s:e]).decode("utf-8", "replace") or "(unnamed tensor)"
    schema = _SCHEMA[kind]
    for number, wire, s, e in fields:
        child = schema.get(number)
        if child is not None and wire == 2:
            found = _external_in(buf, child, s, e, depth + 1)
            if found is not None:
                return found
    return None


def external_data_tensor(path: Path) -> str | None:
    """The name of the first tensor in the ONNX file ``path`` that points at external data
    (initializers, sparse initializers, node attributes, subgraphs, functions), or None.

    Raises ModelError when the file is not a protobuf message at all.
    """
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size == 0:
                raise ModelError(f"{path}: not a valid ONNX model (empty file)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                buf = memoryview(mapped)
                try:
                    return _external_in(buf, "model", 0, size, 0)
                except _WireError as exc:
                    raise ModelError(f"{path}: not a valid ONNX model ({exc})") from None
                finally:
                    buf.release()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
