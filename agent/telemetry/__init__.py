"""Offline telemetry: SQLite store, sampler and summaries, OTLP/HTTP uploader, recorder."""

from __future__ import annotations

from agent.telemetry.status import telemetry_status

__all__ = ["telemetry_status"]
