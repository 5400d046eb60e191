#!/usr/bin/env bash
# The PACS set-up (scripts/pacs.py): Orthanc + DICOMweb from Debian on loopback, the sample volumes as DICOM series
# with their final labels as DICOM SEG, and our server on that DICOMweb root; prints the OHIF address.
# Installs the Debian packages it needs when they are missing (needs root and the package registry, once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/debian_packages.sh orthanc orthanc-dicomweb
exec .venv/bin/python scripts/pacs.py "$@"
