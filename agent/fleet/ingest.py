"""OTLP/JSON ingest: request bodies -> log and metric rows, checked against our contract (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import InputDataError

MAX_RECORDS_PER_REQUEST = 10_000
MAX_ATTR_TEXT = 64 << 10
# Both backends store these as signed 64-bit integers; bigger values are a bad payload (400),
# not a storage failure the device would retry forever.
INT64_MAX = (1 << 63) - 1
# kvlistValue / arrayValue nesting accepted in one attribute value (parsed recursively).
MAX_VALUE_DEPTH = 16


class BadPayloadError(InputDataError):
    """An OTLP request body does not follow the OTLP/JSON shape or our attribute contract."""


@dataclass(frozen=True)
class LogRow:
    device_id: str
    boot_id: str
    seq: int
    time_ns: int
    type: str
    event_name: str
    body: str | None
    attrs: dict[str, Any]


@dataclass(frozen=True)
class MetricRow:
    device_id: str
    name: str
    time_ns: int
    value: float | None
    attrs: dict[str, Any]


def _any_value(value: Any, where: str, depth: int = 0) -> Any:
    if not isinstance(value, dict):
        raise BadPayloadError(f"{where}: AnyValue must be an object")
    if depth > MAX_VALUE_DEPTH:
        # Our devices send flat attributes; a deep tree is an attack on the recursion below.
        raise BadPayloadError(f"{where}: values nested deeper than {MAX_VALUE_DEPTH} levels")
    if "stringValue" in value:
        return _text(value["stringValue"], where)
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        try:
            return int(value["intValue"])  # OTLP/JSON sends 64-bit ints as strings
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e999)
            raise BadPayloadError(f"{where}: intValue is not an integer") from None
    if "doubleValue" in value:
        try:
            return float(value["doubleValue"])
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
            raise BadPayloadError(f"{where}: doubleValue is not a number") from None
    if "arrayValue" in value:
        items = _object(value["arrayValue"], f"{where}.arrayValue").get("values", [])
        return [_any_value(v, where, depth + 1) for v in _list(items, where)]
    if "kvlistValue" in value:
        items = _object(value["kvlistValue"], f"{where}.kvlistValue").get("values", [])
        return _attributes(items, where, depth + 1)
    if "bytesValue" in value:
        return _text(value["bytesValue"], where)
    return None


def _text(value: Any, where: str) -> str:
    text = str(value)
    # PostgreSQL TEXT cannot hold NUL; refusing it here keeps both backends alike.
    if "\x00" in text:
        raise BadPayloadError(f"{where}: string contains a NUL character")
    return text


def _int64(value: int, where: str) -> int:
    if not 0 <= value <= INT64_MAX:
        raise BadPayloadError(f"{where}: {value} is outside 0..2^63-1")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    """An optional JSON object (absent or null reads as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadPayloadError(f"{where}: expected an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadPayloadError(f"{where}: expected a list")
    return value


def _attributes(items: Any, where: str, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in _list(items, where):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise BadPayloadError(f"{where}: attribute without a string key")
        out[item["key"]] = _any_value(item.get("value", {}), f"{where}.{item['key']}", depth)
    return out


def _time_ns(record: Mapping[str, Any], where: str) -> int:
    raw = record.get("timeUnixNano") or record.get("observedTimeUnixNano") or 0
    try:
        time_ns = int(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e999)
        raise BadPayloadError(f"{where}: timeUnixNano is not an integer") from None
    return _int64(time_ns, f"{where}.timeUnixNano")


def _device_of(resource_attrs: Mapping[str, Any], record_attrs: Mapping[str, Any]) -> Any:
    return record_attrs.get("edge_agent.device_id", resource_attrs.get("edge_agent.device_id"))


def parse_otlp_logs(payload: Any) -> list[LogRow]:
    """Rows from an ExportLogsServiceRequest in OTLP/JSON; every record needs our three ids."""
    if not isinstance(payload, dict):
        raise BadPayloadError("body: expected a JSON object")
    rows: list[LogRow] = []
    for i, rl in enumerate(_list(payload.get("resourceLogs"), "resourceLogs")):
        where_r = f"resourceLogs[{i}]"
        if not isinstance(rl, dict):
            raise BadPayloadError(f"{where_r}: expected an object")
        resource = _object(rl.get("resource"), f"{where_r}.resource")
        resource_attrs = _attributes(resource.get("attributes"), where_r)
        for j, sl in enumerate(_list(rl.get("scopeLogs"), f"{where_r}.scopeLogs")):
            if not isinstance(sl, dict):
                raise BadPayloadError(f"{where_r}.scopeLogs[{j}]: expected an object")
            records = _list(sl.get("logRecords"), f"{where_r}.scopeLogs[{j}].logRecords")
            for k, rec in enumerate(records):
                where = f"{where_r}.scopeLogs[{j}].logRecords[{k}]"
                if not isinstance(rec, dict):
                    raise BadPayloadError(f"{where}: expected an object")
                attrs = _attributes(rec.get("attributes"), where)
                device_id = _device_of(resource_attrs, attrs)
                boot_id = attrs.get("edge_agent.boot_id")
                seq = attrs.get("edge_agent.seq")
                if not isinstance(device_id, str) or not device_id:
                    raise BadPayloadError(f"{where}: edge_agent.device_id is missing")
                if not isinstance(boot_id, str) or not boot_id:
                    raise BadPayloadError(f"{where}: edge_agent.boot_id is missing")
                if not isinstance(seq, int) or isinstance(seq, bool):
                    raise BadPayloadError(f"{where}: edge_agent.seq must be an integer")
                body = rec.get("body")
                body_value = _any_value(body, f"{where}.body") if body else None
                rows.append(
                    LogRow(
                        device_id=device_id,
                        boot_id=boot_id,
                        seq=_int64(seq, f"{where}.edge_agent.seq"),
                        time_ns=_time_ns(rec, where),
                        type=str(attrs.get("edge_agent.type", "event")),
                        event_name=str(attrs.get("event.name", "")),
                        body=None if body_value is None else json.dumps(body_value)[:MAX_ATTR_TEXT],
                        attrs=attrs,
                    )
                )
                if len(rows) > MAX_RECORDS_PER_REQUEST:
                    raise BadPayloadError(f"body: more than {MAX_RECORDS_PER_REQUEST} records")
    return rows


def parse_otlp_metrics(payload: Any) -> list[MetricRow]:
    """Gauge and sum points (histograms as their sum) from an ExportMetricsServiceRequest."""
    if not isinstance(payload, dict):
        raise BadPayloadError("body: expected a JSON object")
    rows: list[MetricRow] = []
    for i, rm in enumerate(_list(payload.get("resourceMetrics"), "resourceMetrics")):
        where_r = f"resourceMetrics[{i}]"
        if not isinstance(rm, dict):
            raise BadPayloadError(f"{where_r}: expected an object")
        resource = _object(rm.get("resource"), f"{where_r}.resource")
        resource_attrs = _attributes(resource.get("attributes"), where_r)
        for j, sm in enumerate(_list(rm.get("scopeMetrics"), f"{where_r}.scopeMetrics")):
            if not isinstance(sm, dict):
                raise BadPayloadError(f"{where_r}.scopeMetrics[{j}]: expected an object")
            for k, metric in enumerate(_list(sm.get("metrics"), f"{where_r}.metrics")):
                where = f"{where_r}.scopeMetrics[{j}].metrics[{k}]"
                if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
                    raise BadPayloadError(f"{where}: metric without a name")
                _text(metric["name"], f"{where}.name")
                for kind in ("gauge", "sum", "histogram", "summary"):
                    if kind in metric:
                        data = metric[kind]
                        break
                else:
                    raise BadPayloadError(f"{where}: no gauge, sum or histogram data")
                if not isinstance(data, dict):
                    raise BadPayloadError(f"{where}.{kind}: expected an object")
                for n, point in enumerate(_list(data.get("dataPoints"), f"{where}.dataPoints")):
                    pw = f"{where}.dataPoints[{n}]"
                    if not isinstance(point, dict):
                        raise BadPayloadError(f"{pw}: expected an object")
                    attrs = _attributes(point.get("attributes"), pw)
                    device_id = _device_of(resource_attrs, attrs)
                    if not isinstance(device_id, str) or not device_id:
                        raise BadPayloadError(f"{pw}: edge_agent.device_id is missing")
                    raw = point.get("asDouble", point.get("asInt", point.get("sum")))
                    try:
                        value = None if raw is None else float(raw)
                    except (TypeError, ValueError, OverflowError):
                        raise BadPayloadError(f"{pw}: value is not a number") from None
                    rows.append(
                        MetricRow(device_id, metric["name"], _time_ns(point, pw), value, attrs)
                    )
                    if len(rows) > MAX_RECORDS_PER_REQUEST:
                        raise BadPayloadError(f"body: more than {MAX_RECORDS_PER_REQUEST} points")
    return rows
