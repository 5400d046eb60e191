"""Meta's Segment Anything ViT image encoder (ViT-B / ViT-L / ViT-H), 1024x1024 input -> (B, 256, 64, 64).

16x16 patches, absolute position embedding, transformer blocks that attend inside 14x14 windows except a few
with global attention, decomposed relative position biases (one table per axis), and a conv neck.
Parameter names match Meta's released checkpoints (`pos_embed`, `patch_embed.proj`, `blocks.N.*`, `neck.*`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.models.sam.common import Linear, MLPBlock, build_neck, window_partition, window_unpartition

# Published configurations: width, depth, heads, indices of the global-attention blocks.
VIT_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution; output channels-last (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def _relative_index(size: int, device) -> torch.Tensor:
    """(size, size) index into a (2 * size - 1)-row table: query i, key j -> i - j + size - 1."""
    pos = torch.arange(size, device=device)
    return pos[:, None] - pos[None, :] + (size - 1)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a (h, w) grid of tokens with decomposed relative position biases:
    the bias of query (y, x) for key (y', x') is q . Rh[y - y'] + q . Rw[x - x'] (q unscaled)."""

    def __init__(self, dim: int, num_heads: int, grid_size: int):
        """grid_size: the side of the token grid this layer attends over (the window, or the whole map)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = grid_size
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))

    def position_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Additive attention bias (B', heads, h*w, h*w) for queries q (B', heads, h*w, head_dim)."""
        if h != self.grid_size or w != self.grid_size:
            raise ValueError(f"relative position tables are for a {self.grid_size}x{self.grid_size} grid, "
                             f"got {h}x{w} (the encoder needs its native input size)")
        table_h = self.rel_pos_h[_relative_index(h, q.device)]  # (h, h, head_dim)
        table_w = self.rel_pos_w[_relative_index(w, q.device)]  # (w, w, head_dim)
        grid_q = q.unflatten(2, (h, w))  # (B', heads, h, w, head_dim)
        bias_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, table_h)  # key row k
        bias_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, table_w)  # key column k
        return (bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)).reshape(q.shape[0], q.shape[1], h * w, h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B', h, w, C) -> (B', h, w, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(q, h, w))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))

    def attend_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention over any (B', N, C) token sequence, without the relative position bias
        (MSA's depth branch: the tokens are one position on successive slices)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm transformer block; windowed attention when window_size > 0, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention on the normalised (B, H, W, C) map; windows are zero-padded after normalisation."""
        if self.window_size <= 0:
            return self.attn(x)
        h, w = x.shape[1:3]
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder. Defaults are ViT-B; see VIT_CONFIGS for L and H."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ):
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)
        )
        self.neck = build_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, img_size, img_size), normalised -> (B, out_chans, img_size / patch, img_size / patch)."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"expected a {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2)).contiguous()
