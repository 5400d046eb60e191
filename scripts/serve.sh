#!/usr/bin/env bash
# Set up (if needed) and start the MONAI Label server on the bundled sample data.
# Extra arguments go to `monailabel start_server`, e.g. --conf sam_checkpoint /path/sam_vit_b_01ec64.pth
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The `monailabel` launcher runs whichever `python` is first on PATH; name the venv's instead.
exec .venv/bin/python -m monailabel.main start_server --app apps --studies "${STUDIES:-sample-data}" \
  --uvicorn_app apps.server:app --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
