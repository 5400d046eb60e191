#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet (apt-get update first); a no-op when
# all are there. Used by scripts/test.sh and scripts/pacs.sh (Orthanc and its DICOMweb plugin).
set -euo pipefail
missing=()
for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
