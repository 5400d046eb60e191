#!/usr/bin/env bash
# Set up (if needed) and start the MONAI Label server on the bundled sample data.
# Extra arguments go to `monailabel start_server`, e.g. --conf sam_checkpoint /path/sam_vit_b_01ec64.pth
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/monailabel start_server --app apps --studies "${STUDIES:-sample-data}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
