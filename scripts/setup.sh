#!/usr/bin/env bash
# Create ./.venv and install hypersort-ray with pinned dependencies (constraints.txt).
# constraints.txt pins torch to 2.13.0: on this kind of machine pip takes the CPU build from local disk;
# without the pin pip would download a multi-GB CUDA build. Idempotent: re-running only installs what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" >/dev/null
python -m pip install -q -c constraints.txt -e ".[dev,anatomy,baselines,onnx]"
