"""The daemon: builds source, model, governor and sinks from config and runs the frame loop.

One job per module: wiring (the Daemon: start, stop, signals), frame_loop, status (the
status file), models (first model and reload), ota_link and prometheus. What callers
import from ``agent.daemon`` is re-exported here.
"""

from __future__ import annotations

from agent.config import PreprocessConfig
from agent.control import control_socket_path
from agent.daemon.prometheus import prometheus_text
from agent.daemon.wiring import Daemon, run_daemon
from agent.pipeline.model import (
    backend_options,
    load_model_file,
    load_package_backend,
    package_backend_name,
    package_model_parts,
    read_manifest,
)

__all__ = [
    "Daemon",
    "PreprocessConfig",
    "backend_options",
    "control_socket_path",
    "load_model_file",
    "load_package_backend",
    "package_backend_name",
    "package_model_parts",
    "prometheus_text",
    "read_manifest",
    "run_daemon",
]
