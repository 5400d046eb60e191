"""Training losses shared by the methods that learn from saved labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, per prompt set, averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    inter = (probs * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (probs.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return bce + dice.mean()
