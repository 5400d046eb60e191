"""One-Prompt's prompt encoder (Wu et al., CVPR 2024, section 2.1, supplement section 3): every prompt on the template
becomes two embeddings p1, p2 of the decoder's width C, one token each, (B, 1, C).

- Click: p1 = mean of the positional encodings of the positive clicks + the positive-click embedding;
  p2 = the same over the negative clicks + the negative-click embedding, or the bare negative-click embedding
  when there is no negative click (the supplement: no positional encoding then). At least one positive click.
- BBox: p1 = encoding of the top-left corner + its embedding, p2 = bottom-right corner + its embedding (SAM).
- Doodle: positive and negative scribbles as point lists (sampled points; a point repeated, at the same
  pixel and label, counts once): p1 from the positive points, p2 from the negative ones, averaged as for clicks;
  a side with no points is its bare embedding.
- SegLab: the template image + mask through the frozen SegLab autoencoder (seglab.py) -> its g x g codebook
  vectors, projected to C, plus the positional encoding of their cells, pooled by attention with one learned
  query into a single token; p1 = p2 = that token ("two prompt embeddings share the same parameters"). The
  attention pooling keeps WHERE the mask is (the pooled value carries the positional encodings of the cells it
  attends to); a plain mean of the codes would keep only which codes occur.

Why one token each: eq. (1) adds p1 + p2 to every template token and eq. (2) stacks p1 and p2 as N rows each
beside the N template tokens, i.e. each is one vector broadcast over the grid; several clicks of one kind are
one concept ("the foreground"), so they are averaged into that vector rather than kept as separate tokens.

Coordinates are (x, y) pixels in the encoder's input frame (input_image_size, 256 x 256 for LiteMedSAM), as in
SAM; encodings are taken at pixel centres. The positional encoding is SAM's random-Fourier one, and the decoder
uses the same `pe_layer` for its token grids, so a click's encoding and the encoding of the token under it agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from lib.models.sam.prompt_encoder import PositionEmbeddingRandom
from lib.models.sam.transformer import Attention
from lib.oneprompt.model.seglab import SegLabAutoencoder

PROMPT_KINDS = ("click", "bbox", "doodle", "seglab")

# Rows of PromptEncoder.point_embeddings.
NEG_CLICK, POS_CLICK, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, NEG_DOODLE, POS_DOODLE = range(6)


@dataclass
class Prompt:
    """One kind of prompt for a batch of B templates.

    points: (B, K, 2) x, y pixels; labels: (B, K) 1 positive, 0 negative, -1 padding (click, doodle).
    boxes: (B, 4) x0, y0, x1, y1 pixels (bbox). mask: (B, 1, S, S) or (B, S, S) in {0, 1} and image:
    (B, 3, S, S) in [0, 1], the template image (seglab)."""

    kind: str
    points: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    boxes: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    image: Optional[Tensor] = None

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected one of {PROMPT_KINDS}")
        needed = {"click": ("points", "labels"), "doodle": ("points", "labels"), "bbox": ("boxes",),
                  "seglab": ("mask",)}[self.kind]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} prompt needs {', '.join(missing)}")

    @classmethod
    def click(cls, points, labels) -> "Prompt":
        return cls("click", points=torch.as_tensor(points), labels=torch.as_tensor(labels))

    @classmethod
    def bbox(cls, boxes) -> "Prompt":
        return cls("bbox", boxes=torch.as_tensor(boxes))

    @classmethod
    def doodle(cls, points, labels) -> "Prompt":
        return cls("doodle", points=torch.as_tensor(points), labels=torch.as_tensor(labels))

    @classmethod
    def seglab(cls, mask, image=None) -> "Prompt":
        return cls("seglab", mask=torch.as_tensor(mask), image=None if image is None else torch.as_tensor(image))

    @property
    def batch_size(self) -> int:
        for t in (self.points, self.boxes, self.mask):
            if t is not None:
                return t.shape[0]
        raise ValueError("empty prompt")


def scribble_points(scribble: np.ndarray, max_points: int = 64) -> np.ndarray:
    """A drawn scribble, (H, W) bool (rows y, columns x), -> up to max_points (x, y) pixel coordinates, spread
    evenly along the scribble's pixels in raster order (each pixel at most once)."""
    ys, xs = np.nonzero(scribble)
    if len(xs) > max_points:
        keep = np.linspace(0, len(xs) - 1, max_points).round().astype(int)
        ys, xs = ys[keep], xs[keep]
    return np.stack([xs, ys], axis=1).astype(np.float32)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, input_image_size: Tuple[int, int] = (256, 256),
                 seglab: Optional[SegLabAutoencoder] = None, seglab_heads: int = 4) -> None:
        """
        embed_dim: C, the decoder's width.
        input_image_size: (H, W) of the encoder input, the frame of point and box coordinates.
        seglab: a trained SegLab autoencoder (frozen here: no gradient, eval mode), needed for SegLab prompts.
            Its codebook width sets the projection; with None, the SegLab layers are still built (for a
            codebook width of 64, the default) so that a checkpoint loads whether or not one is attached.
        seglab_heads: heads of the SegLab attention pooling.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # NEG_CLICK, POS_CLICK, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, NEG_DOODLE, POS_DOODLE.
        self.point_embeddings = nn.Embedding(6, embed_dim)
        codebook_dim = seglab.codebook_dim if seglab is not None else 64
        self.seglab_proj = nn.Linear(codebook_dim, embed_dim)
        self.seglab_query = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.seglab_pool = Attention(embed_dim, seglab_heads)
        self.seglab_norm = nn.LayerNorm(embed_dim)
        self.seglab = None
        if seglab is not None:
            self.attach_seglab(seglab)

    def attach_seglab(self, seglab: SegLabAutoencoder) -> None:
        if seglab.codebook_dim != self.seglab_proj.in_features:
            raise ValueError(f"SegLab codebook width {seglab.codebook_dim} != {self.seglab_proj.in_features}")
        seglab.eval()
        for p in seglab.parameters():
            p.requires_grad_(False)
        # Held outside the module tree: it is trained separately, saved separately and never trained here.
        self.__dict__["seglab"] = seglab

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() reach the attached autoencoder too.
        super()._apply(fn, *args, **kwargs)
        if self.seglab is not None:
            self.seglab._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "PromptEncoder":
        super().train(mode)
        if self.seglab is not None:
            self.seglab.eval()
        return self

    # -- helpers --------------------------------------------------------------------------------------------
    def _embedding(self, index: int) -> Tensor:
        return self.point_embeddings.weight[index].reshape(1, 1, -1)

    def encode_coords(self, coords: Tensor) -> Tensor:
        """(B, K, 2) x, y pixels -> (B, K, C) positional encodings at the pixel centres."""
        weight = self.point_embeddings.weight
        return self.pe_layer.forward_with_coords(coords.to(weight.device, weight.dtype) + 0.5,
                                                 self.input_image_size)

    def _mean_encoding(self, encodings: Tensor, weights: Tensor, kind: int) -> Tensor:
        """Weighted mean of (B, K, C) encodings over K (weights (B, K), 0 = absent) + embedding `kind`; rows
        with no weight get the bare embedding (no positional encoding)."""
        total = weights.sum(1, keepdim=True)  # (B, 1)
        mean = (encodings * weights[..., None]).sum(1, keepdim=True) / total.clamp_min(1e-12)[..., None]
        mean = torch.where(total[..., None] > 0, mean, torch.zeros_like(mean))
        return mean + self._embedding(kind)

    # -- the four prompts -----------------------------------------------------------------------------------
    def embed_clicks(self, points: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        labels = labels.to(points.device)
        if not bool((labels == 1).any(1).all()):
            raise ValueError("a click prompt needs at least one positive click per template")
        enc = self.encode_coords(points)
        p1 = self._mean_encoding(enc, (labels == 1).to(enc.dtype), POS_CLICK)
        p2 = self._mean_encoding(enc, (labels == 0).to(enc.dtype), NEG_CLICK)
        return p1, p2

    def embed_boxes(self, boxes: Tensor) -> Tuple[Tensor, Tensor]:
        corners = self.encode_coords(boxes.reshape(-1, 2, 2))  # (B, 2, C): top-left, bottom-right
        return corners[:, :1] + self._embedding(BOX_TOP_LEFT), corners[:, 1:] + self._embedding(BOX_BOTTOM_RIGHT)

    def embed_doodles(self, points: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        labels = labels.to(points.device).long()
        if not bool((labels >= 0).any(1).all()):
            raise ValueError("a doodle prompt needs at least one point per template")
        # Weight 1 / (copies of the same pixel and label in the sample): overlapping points count once.
        keys = torch.cat([points.round().long(), labels[..., None]], dim=-1)  # (B, K, 3)
        weights = torch.empty(labels.shape, dtype=torch.float32, device=points.device)
        for b in range(labels.shape[0]):
            _, inverse, counts = torch.unique(keys[b], dim=0, return_inverse=True, return_counts=True)
            weights[b] = 1.0 / counts[inverse].float()
        enc = self.encode_coords(points)
        weights = weights.to(enc.dtype)
        p1 = self._mean_encoding(enc, weights * (labels == 1), POS_DOODLE)
        p2 = self._mean_encoding(enc, weights * (labels == 0), NEG_DOODLE)
        return p1, p2

    def embed_seglab(self, mask: Tensor, image: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.seglab is None:
            raise ValueError("SegLab prompts need a trained SegLab autoencoder (PromptEncoder(seglab=...) or "
                             "attach_seglab)")
        weight = self.point_embeddings.weight
        device = weight.device
        codes = self.seglab.embed(None if image is None else image.to(device), mask.to(device))  # (B, g*g, D)
        g = self.seglab.grid_size
        cell_pe = self.pe_layer((g, g)).flatten(1).transpose(0, 1).unsqueeze(0)  # (1, g*g, C)
        tokens = self.seglab_proj(codes.to(weight.dtype)) + cell_pe
        pooled = self.seglab_norm(self.seglab_pool(self.seglab_query, tokens, tokens))  # (B, 1, C)
        return pooled, pooled

    def prompt_map(self, prompt: Prompt, sigma: float = 6.0) -> Tensor:
        """The prompt drawn on the template frame, (B, 2, H, W): channel 0 where the user said "this",
        channel 1 where they said "not this". Clicks and doodle points are Gaussian spots (sigma pixels, 1 at
        the point; doodles at sigma / 2, so a stroke stays a stroke); a box is its filled rectangle; a SegLab
        mask is itself. Used only by a model built with `prompt_map=True` (model.py says why)."""
        h, w = self.input_image_size
        device = self.point_embeddings.weight.device
        if prompt.kind == "bbox":
            boxes = prompt.boxes.to(device, torch.float32).reshape(-1, 4)
            ys = torch.arange(h, device=device, dtype=torch.float32)[None, :, None]
            xs = torch.arange(w, device=device, dtype=torch.float32)[None, None, :]
            inside = ((xs >= boxes[:, 0, None, None]) & (xs <= boxes[:, 2, None, None])
                      & (ys >= boxes[:, 1, None, None]) & (ys <= boxes[:, 3, None, None]))
            return torch.stack([inside.float(), torch.zeros_like(inside, dtype=torch.float32)], 1)
        if prompt.kind == "seglab":
            mask = prompt.mask.to(device, torch.float32).reshape(-1, 1, h, w)
            return torch.cat([mask, torch.zeros_like(mask)], 1)
        spread = sigma if prompt.kind == "click" else sigma / 2
        points = prompt.points.to(device, torch.float32)  # (B, K, 2)
        labels = prompt.labels.to(device)
        ys = torch.arange(h, device=device, dtype=torch.float32)
        xs = torch.arange(w, device=device, dtype=torch.float32)
        gy = torch.exp(-(ys[None, None, :] - points[..., 1:]) ** 2 / (2 * spread ** 2))  # (B, K, H)
        gx = torch.exp(-(xs[None, None, :] - points[..., :1]) ** 2 / (2 * spread ** 2))  # (B, K, W)
        spots = gy[..., :, None] * gx[..., None, :]  # (B, K, H, W)
        channels = []
        for value in (1, 0):
            chosen = (labels == value).float()[..., None, None]
            channels.append((spots * chosen).amax(1))
        return torch.stack(channels, 1)

    def forward(self, prompt: Prompt) -> Tuple[Tensor, Tensor]:
        """-> p1, p2, each (B, 1, C)."""
        if prompt.kind == "click":
            return self.embed_clicks(prompt.points, prompt.labels)
        if prompt.kind == "bbox":
            return self.embed_boxes(prompt.boxes)
        if prompt.kind == "doodle":
            return self.embed_doodles(prompt.points, prompt.labels)
        return self.embed_seglab(prompt.mask, prompt.image)
