"""edge-agent: on-device inference with signed, gated over-the-air model updates."""

import os

__version__ = "0.1.0"

# onnxruntime wheels from 1.29 on send usage telemetry to Microsoft from Linux too, unless
# this is set before the library loads. A device must not phone home unasked, keep a
# persistent device id and an event cache in $HOME (2.7 MB seen here, on the SD card), or
# run an uploader thread (which also makes fork() after import unsafe: a forked child
# can wait forever on a lock that thread held). An operator who wants ORT's default
# exports ORT_DISABLE_TELEMETRY=0 before starting the agent.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
