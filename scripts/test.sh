#!/usr/bin/env bash
# Set up (if needed), check the architecture rules and lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/debian_packages.sh orthanc orthanc-dicomweb chromium  # the PACS and browser tests (test_pacs.py, test_ohif.py)
.venv/bin/lint-imports --no-cache  # the dependency rule: .importlinter (README, Architecture)
.venv/bin/ruff check .              # ruff.toml
exec .venv/bin/python -m pytest "$@"
