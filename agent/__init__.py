"""edge-agent: on-device inference with signed, gated over-the-air model updates."""

__version__ = "0.1.0"
