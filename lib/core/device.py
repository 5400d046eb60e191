"""Which device a model runs on."""

from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for and present), else CPU; never fails on a CPU-only machine."""
    if requested and str(requested).startswith("cuda") and torch.cuda.is_available():
        return torch.device(requested)
    if requested in (None, "", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
