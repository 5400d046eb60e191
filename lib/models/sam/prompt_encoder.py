"""SAM's prompt encoder: points and box corners -> sparse tokens, a low-res mask -> a dense embedding."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from lib.models.sam.common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) positions with random Gaussian frequencies (a fixed, saved buffer)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, xy01: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions in [0, 1], x first -> (..., 2 * num_pos_feats) [sin | cos] features."""
        phase = (2 * xy01 - 1) @ self.positional_encoding_gaussian_matrix
        phase = (2 * math.pi) * phase
        return torch.cat([phase.sin(), phase.cos()], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Features at the pixel centres of an (h, w) grid -> (C, h, w)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        xy = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (h, w, 2)
        return self.encode(xy).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel coordinates (x, y) in an (h, w) image -> (B, N, C)."""
        h, w = image_size
        matrix = self.positional_encoding_gaussian_matrix
        extent = torch.tensor([w, h], device=coords.device, dtype=coords.dtype)
        return self.encode((coords / extent).to(matrix.dtype))


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int], input_image_size: Tuple[int, int],
                 mask_in_chans: int, activation: type[nn.Module] = nn.GELU) -> None:
        """
        embed_dim: width of the prompt tokens (the decoder's width).
        image_embedding_size: (h, w) of the image embedding; masks come in at 4x that.
        input_image_size: (H, W) of the encoder input, the frame of point and box coordinates.
        mask_in_chans: hidden channels of the mask downscaling convolutions.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left corner, 3: box bottom-right corner.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell, (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixel coordinates and (B, N) labels (1 fg, 0 bg, -1 padding) -> (B, N [+1], C).

        With pad, a padding token is appended (SAM's convention when no box follows the points)."""
        coords = coords + 0.5  # pixel centres
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        tokens = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        tokens = torch.where(labels == -1, self.not_a_point_embed.weight, tokens)
        tokens = tokens + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        return tokens + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) or (B, 1, 4) boxes x0, y0, x1, y1 in pixels -> (B, 2, C) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        tokens = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_kind = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # (2, C)
        return tokens + corner_kind

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, C, h, w)."""
        return self.mask_downscaling(masks)

    def _device(self) -> torch.device:
        return self.no_mask_embed.weight.device

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
                masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sparse tokens (B, N, C) for the points then the box; dense embedding (B, C, h, w) for the mask
        (a learned constant when no mask is given)."""
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty(batch, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense
