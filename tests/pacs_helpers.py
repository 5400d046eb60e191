"""Orthanc from Debian with the sample series in it, and our server on its DICOMweb root: for test_pacs.py (Slicer's
requests) and test_ohif.py (OHIF in a browser). Without Orthanc these tests fail and say how to install it."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from helpers import REPO, Server, free_port

sys.path.insert(0, os.path.join(REPO, "scripts"))
import pacs  # noqa: E402
import pacs_data  # noqa: E402


def start_orthanc(root: str, names=("head_ct",)) -> tuple["pacs.Orthanc", dict]:
    """Orthanc on a free port with the named sample volumes as series: (server, {name: write_series' info})."""
    if shutil.which("Orthanc") is None or not os.path.exists(pacs.DICOMWEB_PLUGIN):
        pytest.fail("Orthanc with its DICOMweb plugin is not installed: run the README's test command "
                    "(bash scripts/test.sh installs the Debian packages orthanc and orthanc-dicomweb)")
    server = pacs.Orthanc(root, free_port()).start()
    series = {}
    for name in names:
        series[name] = pacs_data.write_series(name, os.path.join(root, "dicom"))
        server.upload(series[name]["folder"])
    return server, series


def start_app(pacs_server: "pacs.Orthanc", root: str, conf: dict | None = None) -> Server:
    """Our server with --studies at the PACS' DICOMweb root, its series cache under root."""
    return Server(pacs_server.dicomweb, os.path.join(root, "server.log"),
                  conf={"models_dir": os.path.join(root, "model"), **(conf or {})},
                  env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": os.path.join(root, "cache")}).start()
