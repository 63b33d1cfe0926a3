#!/usr/bin/env bash
# Create (or reuse) .venv and install the agent with the LiteRT runtime and dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[litert,dev]"
echo "edge-agent installed in .venv ($(.venv/bin/edge-agent --version))"
