"""The fleet page's drift column reads what a device really sends: the summary's `drift`
figures (agent/telemetry/drift.py), through the real OTLP encoding and ingest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from agent.fleet.ingest import parse_otlp_logs
from agent.fleet.page import drift_of
from agent.telemetry import otlp
from agent.telemetry.drift import DriftFigures
from agent.telemetry.store import StoredRecord


def summary_record(attrs: dict[str, Any]) -> StoredRecord:
    return StoredRecord(
        id=1,
        device_id="d1",
        boot_id="boot-1",
        seq=1,
        type="summary",
        priority=1,
        name="summary",
        time_unix_ns=1_796_000_000 * 10**9,
        observed_unix_ns=1_796_000_000 * 10**9,
        clock_ok=True,
        attrs=attrs,
        size_bytes=100,
    )


@dataclass(frozen=True)
class Row:
    id: str
    attrs: dict[str, Any]  # what the device (or a liar) put in its summary
    shown: float | None


FIGURES = DriftFigures(
    frames=200, class_psi=0.5144, class_kl=0.16, confidence_psi=0.27, confidence_kl=0.1
)
ROWS = [
    Row("device-summary-drift-figures", {"frames": 200, "drift": FIGURES.to_dict()}, 0.5144),
    Row("no-drift-reported", {"frames": 200}, None),
    Row("flat-number", {"drift": 0.3}, 0.3),
    Row("figures-without-psi", {"drift": {"frames": 3}}, None),
    Row("psi-not-a-number", {"drift": {"class_psi": "lots"}}, None),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_drift_column_from_a_real_summary(row: Row) -> None:
    [ingested] = parse_otlp_logs(otlp.logs_request([summary_record(row.attrs)]))
    assert drift_of(ingested.attrs) == row.shown
