"""TinyViT-5M image encoder in the configuration LiteMedSAM distilled MedSAM's ViT-B into.

Input (B, 3, 256, 256) in [0, 1]; output the (B, 256, 64, 64) embedding SAM's mask decoder expects. The trunk:
a 1x1 conv-BN stem, one stage of MBConv blocks at full resolution, then three stages of windowed attention blocks
(each followed by a depthwise conv and an MLP). Stages 0-2 end with a strided conv "merge"; the merge into the
last stage keeps the 64x64 grid. Attention carries a learned bias per head and per (|dy|, |dx|) offset inside
its window.

Tensors between blocks are (B, H, W, C) channels-last; the convolutions see them as NCHW views in channels_last
memory format, so no layout copies are made between the conv and attention parts.
Module and parameter names follow the LiteMedSAM checkpoint (`patch_embed.seq`, `layers.i.blocks.j`,
`layers.i.downsample`, `neck`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.models.sam.common import Linear, build_neck, gelu_, window_partition, window_unpartition


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d, children named `c` and `bn` as in the checkpoint.

    In eval mode the BatchNorm is folded into the convolution's weights on the fly (weights are tiny, activations
    are not), which saves one pass over the output."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                           bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, C, H, W) view (channels_last strides when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


def _as_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Stem: 1x1 conv-BN to half width, GELU, 1x1 conv-BN to the first stage's width (no downsampling)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        # Indices 0 and 2 are the checkpoint's; 1 is the (parameter-free) activation.
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H, W, embed_dim)."""
        return _as_nhwc(self.seq(image.contiguous(memory_format=torch.channels_last)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual add, GELU after each step."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = _as_nchw(x)
        y = gelu_(self.conv1(x))
        y = gelu_(self.conv2(y))
        y = self.conv3(y)
        y = y + x if y.requires_grad else y.add_(x)
        return _as_nhwc(gelu_(y))


class ConvMerge(nn.Module):
    """Between stages: 1x1 conv to the next width, GELU, depthwise 3x3 with `stride`, GELU, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H / stride, W / stride, out_dim)."""
        x = gelu_(self.conv1(_as_nchw(x)))
        x = gelu_(self.conv2(x))
        return _as_nhwc(self.conv3(x))


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention over a window of tokens, with a learned bias per head for each
    (|dy|, |dx|) offset between two tokens of the window."""

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        # The checkpoint indexes offsets as |dy| * window + |dx|.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        yy, xx = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        yy, xx = yy.flatten(), xx.flatten()
        offset_index = (yy[:, None] - yy[None, :]).abs() * window_size + (xx[:, None] - xx[None, :]).abs()
        self.register_buffer("offset_index", offset_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B', N, C) -> (B', N, C), N = window_size ** 2."""
        b, n, c = x.shape
        # The checkpoint's qkv output is laid out head by head, each head holding its q, k and v in turn.
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B', heads, N, head_dim)
        # (1, heads, N, N): a 4-D mask lets PyTorch pick its fused (flash) kernel on CPU, a 3-D one does not.
        bias = self.attention_biases[:, self.offset_index].unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attend_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention over any (B', N, C) token sequence, without the window's positional bias
        (MSA's depth branch: the tokens are one position on successive slices)."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyViTMlp(nn.Module):
    """Pre-norm feed-forward: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (+ residual), depthwise conv-BN, MLP (+ residual)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, kernel_size=local_conv_size, groups=dim)
        self.mlp = TinyViTMlp(dim, int(dim * mlp_ratio))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention inside non-overlapping windows of a (B, H, W, C) map (zero-padded at the bottom/right)."""
        b, h, w, c = x.shape
        ws = self.window_size
        windows, padded = window_partition(x, ws)
        windows = self.attn(windows.reshape(-1, ws * ws, c)).reshape(-1, ws, ws, c)
        return window_unpartition(windows, ws, padded, (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.attention(x)
        x = _as_nhwc(self.local_conv(_as_nchw(x)))
        return x + self.mlp(x)


class Stage(nn.Module):
    """A run of blocks at one resolution, then an optional merge to the next stage."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViTImageEncoder(nn.Module):
    """TinyViT trunk + SAM neck. Defaults: LiteMedSAM's TinyViT-5M (256x256 input -> 256x64x64)."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ):
        """Stage 0 is convolutional (its num_heads / window_sizes entries are unused placeholders kept so the
        per-stage lists line up); merge_strides[i] is the stride of the merge after stage i."""
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n and len(merge_strides) == n - 1):
            raise ValueError("embed_dims, depths, num_heads, window_sizes need one entry per stage, "
                             "merge_strides one per stage but the last")
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = embed_dims[i]
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depths[i])]
            else:
                blocks = [TinyViTBlock(dim, num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                          for _ in range(depths[i])]
            merge = ConvMerge(dim, embed_dims[i + 1], merge_strides[i]) if i < n - 1 else None
            self.layers.append(Stage(blocks, merge))
        self.neck = build_neck(embed_dims[-1], out_chans)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_chans, H / 4, W / 4) with the default strides."""
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        return self.neck(_as_nchw(x)).contiguous()
