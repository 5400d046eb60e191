#!/usr/bin/env bash
# Create .venv and install the pinned dependency set (no-op when requirements.txt has not changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  start=$(date +%s)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.txt
  # Fail here, not at the first request, if the import path is broken.
  .venv/bin/python - <<'PY'
import importlib.util, sys
import torch, monai, monailabel  # noqa: F401
from monailabel.interfaces.app import MONAILabelApp  # noqa: F401
for forbidden in ("torchvision", "timm", "sam2"):
    if importlib.util.find_spec(forbidden) is not None:
        sys.exit(f"{forbidden} is installed in .venv: it must not be (see requirements.txt)")
print(f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), monai {monai.__version__}, "
      f"monailabel {monailabel.__version__}")
PY
  echo "$want" > "$stamp"
  echo "setup: installed in $(( $(date +%s) - start )) s; .venv is $(du -sh .venv | cut -f1)"
fi
