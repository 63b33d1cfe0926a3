"""Stored telemetry rows as OTLP/JSON: every row a log record; summaries also as metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from agent import __version__
from agent.telemetry import jsonsafe
from agent.telemetry.store import StoredRecord

SCOPE_NAME = "edge_agent.telemetry"
SEVERITY_INFO = 9
SEVERITY_WARN = 13
SEVERITY_ERROR = 17
TEMPORALITY_DELTA = 1
TEMPORALITY_CUMULATIVE = 2


def any_value(value: Any) -> dict[str, Any]:
    """An OTLP AnyValue; lists and mappings become JSON strings (the contract's rule), None
    and NaN/Inf the empty AnyValue (null)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        # OTLP/JSON carries int64 as a decimal string.
        return {"intValue": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            return {}  # an empty AnyValue is OTLP's null, as NaN/Inf are null everywhere
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if value is None:
        return {}
    text = jsonsafe.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return {"stringValue": text}


def _number(value: Any) -> float | None:
    """A stored figure as a double; None (written as null) when it is missing or was NaN/Inf,
    which the store keeps as null: a figure the model or a sensor could not give."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _kv(key: str, value: Any) -> dict[str, Any]:
    return {"key": key, "value": any_value(value)}


def resource(device_id: str) -> dict[str, Any]:
    return {
        "attributes": [
            _kv("service.name", "edge-agent"),
            _kv("service.version", __version__),
            _kv("edge_agent.device_id", device_id),
        ]
    }


def _severity(rec: StoredRecord) -> tuple[int, str]:
    if rec.name == "error" or rec.name.endswith(".error"):
        return SEVERITY_ERROR, "ERROR"
    if rec.name in ("telemetry.db_quarantined", "clock.jump"):
        return SEVERITY_WARN, "WARN"
    return SEVERITY_INFO, "INFO"


def identity_attributes(rec: StoredRecord) -> list[dict[str, Any]]:
    return [
        _kv("edge_agent.device_id", rec.device_id),
        _kv("edge_agent.boot_id", rec.boot_id),
        _kv("edge_agent.seq", rec.seq),
    ]


def log_record(rec: StoredRecord) -> dict[str, Any]:
    number, text = _severity(rec)
    attributes = [
        *identity_attributes(rec),
        _kv("edge_agent.type", rec.type),
        _kv("event.name", rec.name),
        _kv("edge_agent.clock_ok", rec.clock_ok),
    ]
    attributes += [_kv(f"edge_agent.attr.{k}", v) for k, v in sorted(rec.attrs.items())]
    return {
        "timeUnixNano": str(rec.time_unix_ns),
        "observedTimeUnixNano": str(rec.observed_unix_ns),
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": rec.name},
        "attributes": attributes,
    }


def _by_device(records: Sequence[StoredRecord]) -> dict[str, list[StoredRecord]]:
    groups: dict[str, list[StoredRecord]] = {}
    for rec in records:
        groups.setdefault(rec.device_id, []).append(rec)
    return groups


def logs_request(records: Sequence[StoredRecord]) -> dict[str, Any]:
    """An ExportLogsServiceRequest in OTLP/JSON (one resource per device id)."""
    return {
        "resourceLogs": [
            {
                "resource": resource(device_id),
                "scopeLogs": [
                    {
                        "scope": {"name": SCOPE_NAME, "version": __version__},
                        "logRecords": [log_record(r) for r in group],
                    }
                ],
            }
            for device_id, group in _by_device(records).items()
        ]
    }


def _point(rec: StoredRecord, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    start = int(rec.attrs.get("start_unix_ns", rec.time_unix_ns))
    attributes = identity_attributes(rec)
    attributes += [_kv(k, v) for k, v in (extra or {}).items()]
    return {
        "startTimeUnixNano": str(start),
        "timeUnixNano": str(rec.time_unix_ns),
        "attributes": attributes,
    }


def _gauge(name: str, unit: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "unit": unit, "gauge": {"dataPoints": points}}


def _sum(name: str, unit: str, points: list[dict[str, Any]], temporality: int) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "sum": {
            "dataPoints": points,
            "aggregationTemporality": temporality,
            "isMonotonic": True,
        },
    }


def summary_metrics(rec: StoredRecord) -> list[dict[str, Any]]:
    """The metrics one interval summary row turns into."""
    a = rec.attrs
    frames = int(a.get("frames", 0))
    metrics = [
        _sum(
            "edge_agent.inference.frames",
            "{frame}",
            [{**_point(rec), "asInt": str(frames)}],
            TEMPORALITY_DELTA,
        ),
        _gauge(
            "edge_agent.inference.fps",
            "{frame}/s",
            [{**_point(rec), "asDouble": _number(a.get("fps", 0.0))}],
        ),
        _gauge(
            "edge_agent.scheduler.fps_cap",
            "{frame}/s",
            [
                {
                    **_point(rec, {"governor.state": a.get("governor_state", "")}),
                    "asDouble": _number(a.get("fps_cap", 0.0)),
                }
            ],
        ),
    ]
    if frames and "latency_p50_ms" in a:
        metrics.append(_latency_summary(rec, frames))
    classes = a.get("class_counts") or {}
    if classes:
        metrics.append(
            _sum(
                "edge_agent.inference.class_count",
                "{frame}",
                [
                    {**_point(rec, {"class": str(k)}), "asInt": str(int(v))}
                    for k, v in classes.items()
                ],
                TEMPORALITY_DELTA,
            )
        )
    conf_counts = a.get("confidence_counts")
    if conf_counts and frames:
        metrics.append(_confidence_histogram(rec, conf_counts))
    temps = a.get("temps_c") or {}
    if temps:
        metrics.append(
            _gauge(
                "edge_agent.temperature",
                "Cel",
                [
                    {**_point(rec, {"zone": z}), "asDouble": _number(t)}
                    for z, t in sorted(temps.items())
                ],
            )
        )
    counters = a.get("telemetry_counters") or {}
    if counters:
        metrics.append(
            _sum(
                "edge_agent.telemetry.rows_lost",
                "{row}",
                [
                    {**_point(rec, {"reason": k}), "asInt": str(int(v))}
                    for k, v in sorted(counters.items())
                ],
                TEMPORALITY_CUMULATIVE,
            )
        )
    return metrics


def _latency_summary(rec: StoredRecord, frames: int) -> dict[str, Any]:
    """The interval's latency as an OTLP summary: count, sum and p50/p95/p99."""
    a = rec.attrs
    return {
        "name": "edge_agent.inference.latency",
        "unit": "ms",
        "summary": {
            "dataPoints": [
                {
                    **_point(rec),
                    "count": str(frames),
                    "sum": _number(a.get("latency_sum_ms", 0.0)),
                    "quantileValues": [
                        {"quantile": 0.5, "value": _number(a["latency_p50_ms"])},
                        {"quantile": 0.95, "value": _number(a["latency_p95_ms"])},
                        {"quantile": 0.99, "value": _number(a["latency_p99_ms"])},
                    ],
                }
            ]
        },
    }


def _confidence_histogram(rec: StoredRecord, conf_counts: Sequence[Any]) -> dict[str, Any]:
    """The interval's confidence counts per bucket as an OTLP delta histogram."""
    a = rec.attrs
    return {
        "name": "edge_agent.inference.confidence",
        "unit": "1",
        "histogram": {
            "dataPoints": [
                {
                    **_point(rec),
                    "count": str(int(sum(conf_counts))),
                    "bucketCounts": [str(int(c)) for c in conf_counts],
                    "explicitBounds": [_number(b) for b in a.get("confidence_bounds", [])],
                }
            ],
            "aggregationTemporality": TEMPORALITY_DELTA,
        },
    }


def metrics_request(records: Sequence[StoredRecord]) -> dict[str, Any] | None:
    """An ExportMetricsServiceRequest for the summary rows in records (None when none)."""
    resource_metrics = []
    for device_id, group in _by_device([r for r in records if r.type == "summary"]).items():
        metrics: list[dict[str, Any]] = []
        for rec in group:
            metrics += summary_metrics(rec)
        scope = {"name": SCOPE_NAME, "version": __version__}
        resource_metrics.append(
            {
                "resource": resource(device_id),
                "scopeMetrics": [{"scope": scope, "metrics": metrics}],
            }
        )
    return {"resourceMetrics": resource_metrics} if resource_metrics else None
