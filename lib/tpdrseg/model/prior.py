"""TP-DRSeg equation (1): the explicit prior map P_e from visual and text priors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def explicit_prior(visual: torch.Tensor, text: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """S = (P_v / |P_v|) . (P_t / |P_t|)^T, then per-image min-max normalisation.

    visual: (B, H_s, W_s, C) per-location features; text: (C,), (1, C) or (B, C). Returns P_e (B, H_s, W_s) in [0, 1]
    (all zeros where S is constant).
    """
    if text.dim() == 1:
        text = text[None]
    s = torch.einsum("bhwc,bc->bhw", F.normalize(visual, dim=-1), F.normalize(text, dim=-1).expand(visual.shape[0], -1))
    flat = s.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (s - lo) / (hi - lo).clamp(min=eps)
