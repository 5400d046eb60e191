"""TP-DRSeg's prior-aligned injector (section 2.2, Fig. 3a), placed after an image-encoder block.

    F_act = F x P_e                                   (P_e resized to F's grid)
    Q = phi_q(F), K = phi_k(F_act), V = phi_v(F_act)  (phi: 1x1 conv with stride 4, the "zoomed projection")
    A = softmax(Q K^T / sqrt(d)) V                    (at 1/4 resolution)
    F'' = F + gamma * Upsample(A)

Choices where the paper is loose:

* Query from F, key and value from F_act: the text says so ("F_i as the query, F_act as key and value"); eq. (2)
  writes F_act for all three. Reading the query from the un-gated feature lets every location, including those the
  prior switches off, look up prior-highlighted context.
* gamma multiplies the attention branch, not F: eq. (3) writes gamma F + attention, but with gamma on F the block's
  output is replaced by the attention output at the start of training. With gamma on the new branch and gamma = 0 at
  start (the DANet position-attention form the module follows) the untrained model IS the frozen SAM, and the
  upsampling of eq. (3)'s output is moved onto the branch, so F keeps its full resolution.
* d (query/key width) = C / 8 (at least 16), as DANet; V keeps C channels so the branch adds to F directly.
* Memory: attention is over (H/4)(W/4) tokens, never H*W: at TinyViT's 128x128 stage, 1024 tokens (a 1024 x 1024
  matrix per image), at its 64x64 stages 256 tokens; `scaled_dot_product_attention` may also avoid materialising it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PriorAlignedInjector(nn.Module):
    def __init__(self, dim: int, zoom: int = 4, key_dim: int | None = None):
        """dim: channels of the block output it follows; zoom: stride of the 1x1 projections; key_dim: d."""
        super().__init__()
        key_dim = key_dim or max(16, dim // 8)
        self.zoom = zoom
        self.q = nn.Conv2d(dim, key_dim, 1, stride=zoom)
        self.k = nn.Conv2d(dim, key_dim, 1, stride=zoom)
        self.v = nn.Conv2d(dim, dim, 1, stride=zoom)
        self.gamma = nn.Parameter(torch.zeros(()))  # 0: the untrained injector is the identity

    def forward(self, x: Tensor, prior: Tensor) -> Tensor:
        """x (N, H, W, C) channels-last block output, prior (N, h, w) in [0, 1] -> (N, H, W, C)."""
        n, h, w, c = x.shape
        feat = x.permute(0, 3, 1, 2)  # NCHW view
        if prior.shape[-2:] != (h, w):
            prior = F.interpolate(prior[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        activated = feat * prior[:, None].to(feat.dtype)
        q, k, v = self.q(feat), self.k(activated), self.v(activated)  # (N, d|C, h', w')
        hz, wz = q.shape[-2:]
        # single-head attention over the zoomed grid: (N, 1, h'w', d) x (N, 1, h'w', C)
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(Q K^T / sqrt(d)) V
        out = out.transpose(1, 2).reshape(n, c, hz, wz)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return x + self.gamma * out.permute(0, 2, 3, 1)

