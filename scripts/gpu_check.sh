#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): set up, then run every CUDA path once and write
# OUT_DIR/gpu_check.json and gpu_check.md (default OUT_DIR: gpu-check/). On a CPU it skips the CUDA parts, says so,
# and still writes the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/gpu_check.py "$@"
