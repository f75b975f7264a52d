#!/usr/bin/env bash
# The test command: install (idempotent), lint, then the whole suite (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
ruff check hypersort_ray tests benchmarks
python -m pytest -q "$@"
