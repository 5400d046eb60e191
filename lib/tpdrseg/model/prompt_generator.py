"""TP-DRSeg's class-specific prompt generator (section 2.3, Fig. 3b): SAM decoder prompts from the image embedding
and the class's explicit prior, instead of clicks or boxes.

    F_p^c = F_e x P_e^c                     one channel group per class: the image embedding gated by that class's
                                            prior (the paper's "replicate F_p c times, keep the class's channels")
    E_d = phi_dense(F_p^c)                  convolution -> the decoder's dense embedding (C_e x h x w)
    E_s = phi_sparse(reshape(F_p^c))        (C_e, h*w) -> linear over the h*w positions -> n tokens of C_e

The projections are shared by all classes: what makes a group class-specific is its prior P_e^c (and so its text).
Shared weights let the model take free text (an unseen description) as well as the configured classes, and K classes
run as one batch of K groups.

* Dense: 3x3 conv (C_e -> hidden), GELU, 1x1 conv (hidden -> C_e), added to SAM's learned "no mask" embedding. The
  last conv starts at zero, so the untrained decoder sees exactly what SAM sees with no mask prompt.
* Sparse: n tokens (default 4: a few, like SAM's point/box prompts; the decoder's cost grows with tokens). Each token
  is a learned weighting of the h*w positions (starting near a plain mean, i.e. the prior-weighted average feature),
  then a linear map of its C_e channels.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClassPromptGenerator(nn.Module):
    def __init__(self, embed_dim: int = 256, embedding_size: Tuple[int, int] = (64, 64), num_tokens: int = 4,
                 hidden: int = 64, no_mask_embed: Tensor | None = None):
        """embed_dim: C_e (the decoder width); embedding_size: (h, w) of the image embedding; num_tokens: sparse
        tokens per class; hidden: width of the dense branch; no_mask_embed: SAM's (1, C_e) no-mask embedding."""
        super().__init__()
        h, w = embedding_size
        self.embedding_size = (h, w)
        self.dense = nn.Sequential(nn.Conv2d(embed_dim, hidden, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(hidden, embed_dim, 1))
        nn.init.zeros_(self.dense[2].weight)
        nn.init.zeros_(self.dense[2].bias)
        base = no_mask_embed.detach().reshape(-1) if no_mask_embed is not None else torch.zeros(embed_dim)
        self.dense_base = nn.Parameter(base.clone().float())
        self.spatial = nn.Linear(h * w, num_tokens)
        with torch.no_grad():
            self.spatial.weight.normal_(1.0 / (h * w), 1.0 / (h * w))
            self.spatial.bias.zero_()
        self.channel = nn.Linear(embed_dim, embed_dim)

    def forward(self, features: Tensor, prior: Tensor) -> Tuple[Tensor, Tensor]:
        """features (N, C_e, h, w), prior (N, h', w') in [0, 1] (N = images x classes) ->
        sparse (N, num_tokens, C_e), dense (N, C_e, h, w)."""
        if prior.shape[-2:] != features.shape[-2:]:
            prior = F.interpolate(prior[:, None], size=features.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        gated = features * prior[:, None]
        dense = self.dense(gated) + self.dense_base[None, :, None, None]
        sparse = self.channel(self.spatial(gated.flatten(2)).transpose(1, 2))
        return sparse, dense
