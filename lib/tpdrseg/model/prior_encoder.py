"""TP-DRSeg's explicit prior encoder (section 2.1): per-class prior maps P_e from an image and class text embeddings.

The paper: a frozen CLIP image tower gives per-patch features P_v (H_s x W_s x C_t), a frozen CLIP text tower embeds
the class's *explicit description* into P_t, S = (P_v / |P_v|) . (P_t / |P_t|)^T (eq. 1), P_e = min-max(S).

Two visual towers:

* `ClipVisualPrior` (mode "clip"): exactly the paper, with the user's CLIP weights (`clip.dense_image_features`,
  MaskCLIP-style dense tokens). Nothing in it is trained.
* `LearnedVisualPrior` (mode "learned", the offline default): the default text encoder (MiniLM, 384-d) has no image
  tower, so there is no visual space the text already lives in. OUR SUBSTITUTE for CLIP's image tower is a small
  LEARNED per-pixel projection (2-layer MLP, i.e. two 1x1 convolutions) from the FROZEN LiteMedSAM image features
  into the 384-d text space. It is trained on the segmentation data together with the injectors, prompt generator and
  decoder; the text embeddings stay frozen. So the prior is only as "vision-language" as that training makes it: it
  is a learned lesion heat map indexed by the text embedding, not zero-shot CLIP knowledge.

Either way the similarity is computed for K classes at once: visual (B, h, w, C) x text (K, C) or (B, K, C) ->
S (B, K, h, w), then min-max per image and class -> P_e in [0, 1] (all zeros where S is constant).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def similarity_maps(visual: Tensor, text: Tensor) -> Tensor:
    """Eq. (1) for K texts at once: visual (B, h, w, C), text (K, C) or (B, K, C) -> cosine maps S (B, K, h, w)."""
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(visual.shape[0], -1, -1)
    return torch.einsum("bhwc,bkc->bkhw", F.normalize(visual, dim=-1), F.normalize(text, dim=-1))


def minmax_maps(s: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max normalisation of each (h, w) map of a (..., h, w) tensor to [0, 1] (Norm in section 2.1)."""
    flat = s.flatten(-2)
    lo = flat.amin(-1)[..., None, None]
    hi = flat.amax(-1)[..., None, None]
    return (s - lo) / (hi - lo).clamp(min=eps)


class LearnedVisualPrior(nn.Module):
    """Per-pixel 2-layer MLP from frozen SAM image features (B, C_in, h, w) to the text space (B, h, w, text_dim).

    Our stand-in for CLIP's image tower (see the module docstring): trained on the segmentation data. 1x1 only, so
    the prior's receptive field is that of the frozen SAM features it reads (the whole 64x64 neck output by default),
    and the map keeps the SAM grid (64x64 for LiteMedSAM: 4 px per prior cell at 256 px input).
    """

    def __init__(self, in_chans: int = 256, text_dim: int = 384, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_chans, hidden, 1), nn.GELU(), nn.Conv2d(hidden, text_dim, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).permute(0, 2, 3, 1)


class ClipVisualPrior(nn.Module):
    """CLIP's frozen dense image features (B, H/16, W/16, embed_dim) of the input image, as in the paper.

    image_size: the side CLIP sees (the image is resized to it). At 256 px CLIP ViT-B/16 gives a 16x16 grid, too
    coarse for microaneurysms; the default 512 gives 32x32 (the paper feeds 1024 px: 64x64)."""

    def __init__(self, clip: nn.Module, image_size: int = 512, mode: str = "maskclip"):
        super().__init__()
        self.clip = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.image_size = int(image_size)
        self.mode = mode

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: always in eval mode
        return self

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        from lib.tpdrseg.model.clip import normalize_images

        if images01.shape[-1] != self.image_size or images01.shape[-2] != self.image_size:
            images01 = F.interpolate(images01, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return self.clip.dense_image_features(normalize_images(images01), self.mode).float()


class ExplicitPriorEncoder(nn.Module):
    """Visual tower + eq. (1) + min-max: (visual input, text (K, D) or (B, K, D)) -> (P_e, S), each (B, K, h, w).

    The visual input is the image in [0, 1] for CLIP, the frozen SAM features (B, C, h, w) for the learned tower.
    `prior_logits(S)` = a * S + b, with learnable a, b, is used only by the optional auxiliary loss that teaches the
    learned tower to light up the class's lesions (CLIP needs no such help; the paper has none)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.mode = "clip" if isinstance(visual, ClipVisualPrior) else "learned"
        # CLIP's logit scale starts at 1/0.07; cosines are small, so a large scale is needed for useful logits.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, visual_input: Tensor, text: Tensor) -> Tuple[Tensor, Tensor]:
        s = similarity_maps(self.visual(visual_input), text.to(visual_input.dtype))
        return minmax_maps(s), s

    def prior_logits(self, s: Tensor) -> Tensor:
        return self.logit_scale.exp() * s + self.logit_bias
