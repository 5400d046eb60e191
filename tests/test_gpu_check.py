"""scripts/gpu_check.sh runs to completion here, and on a CPU says of every CUDA part that it was skipped and why."""

from __future__ import annotations

import json
import os
import subprocess

import torch

from tests.helpers import REPO


def test_gpu_check_runs_and_reports(tmp_path):
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"fixture_twin", "encoder_decoder", "http_clicks", "msa_epoch", "whole_volume"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| part | status |" in markdown
    if torch.cuda.is_available():
        assert all(p["status"] in ("ran", "passed") for p in parts.values()), parts
    else:
        print("no CUDA here: the GPU check's CUDA parts were skipped (run scripts/gpu_check.sh on a GPU machine)")
        assert parts["fixture_twin"]["status"] == "skipped"
        for name in ("encoder_decoder", "http_clicks", "msa_epoch", "whole_volume"):
            assert parts[name]["status"].startswith("skipped: no CUDA"), parts[name]
        assert report["device"] == "no CUDA device"
        assert "not measured on a GPU" in markdown
