"""Small layers shared by the SAM image encoders, prompt encoder and mask decoder."""

from __future__ import annotations

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn


# Below this many rows a plain GEMM is as fast and the conv set-up is not worth it.
_CONV_LINEAR_MIN_ROWS = 256


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) that on CPU runs large inputs through oneDNN's 1x1 convolution.

    A (..., in) tensor is a channels-last (1, in, 1, rows) image, so the product is one 1x1 convolution. On the
    CPUs we measured, oneDNN runs it at 2-2.5x the speed of the MKL GEMM behind F.linear (about 500 vs 200
    GFLOP/s on 2 cores of an AMD EPYC); results agree to float32 rounding. Elsewhere (CUDA, small inputs, no
    oneDNN) it is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (x.device.type != "cpu" or rows < _CONV_LINEAR_MIN_ROWS or not torch.backends.mkldnn.is_available()
                or x.dtype not in (torch.float32, torch.bfloat16)):
            return F.linear(x, self.weight, self.bias)
        image = x.reshape(1, 1, rows, x.shape[-1]).permute(0, 3, 1, 2)
        out = F.conv2d(image, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Computed as a LayerNorm of the (B, H, W, C) view: fast when x is in channels_last memory (the conv outputs
    it follows usually are), and the result is channels_last too."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear, back to the input width (the ViT / two-way transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the decoder's hypernetworks and IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, computed in place when autograd does not track x. On large feature maps this saves
    allocating a fresh output, which on CPU costs more than the GELU itself (the pages are new to the process)."""
    if x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


def build_neck(in_chans: int, out_chans: int) -> nn.Sequential:
    """The encoders' output head: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (keys neck.0 ... neck.3)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), zero-padding H and W up to multiples of `window`.

    Returns the windows and the padded (H, W), which `window_unpartition` needs."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nWindows, window, window, C) -> (B, H, W, C), padding removed.

    The result is a view into the padded map when there was padding (callers add it to a residual)."""
    hp, wp = padded_hw
    h, w = hw
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c).transpose(2, 3).reshape(-1, hp, wp, c)
    return x[:, :h, :w] if (hp != h or wp != w) else x
