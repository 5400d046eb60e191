"""One-Prompt's Prompt-Parser (Wu et al., CVPR 2024, section 2.2, equations (1)-(3), Fig. 2c).

Inputs on one level's token grid of N = h * w tokens of width L: the template tokens e_t and query tokens e_q
(B, N, L), and the two prompt embeddings p1, p2 (B, 1, L), one token each.

(1) e_tq = e_t * (p1 + p2 + e_q)                      elementwise, p1 and p2 broadcast over the N tokens.
(2) M = w [e_t; p1; p2] e_q^T / sqrt(L)               w in R^{N x 3N} mixes along the token axis; M is N x N.
    The 3N x L stack is the N template tokens, then p1 repeated N times, then p2 repeated N times (the paper
    writes [e_t; p1; p2] in R^{3N x L}, so each prompt embedding fills N rows; ours are one token, repeated).
    1 / sqrt(L) is a constant scale (the attention convention) keeping Conv(M) of order 1 at initialisation;
    the paper's equation has none, and it could be folded into the convolution's weights.
(3) Masking step. M is viewed as a map over the QUERY grid with N channels: column j of M (one value per mixed
    template row) belongs to query position j, which is where (2) "transfers the activation to the query
    domain". A k x k convolution (N -> 2 channels) gives, per query position x, a mean map m(x) = softplus(.)
    and a variance v(x) = softplus(.) + v_min (in grid cells^2). k_G is a Gaussian kernel of per-pixel variance
    v(x) centred on x, applied to the mean map over a (2R+1)^2 window:
        k_G(x) = sum_d g_x(d) m(x + d) / sum_d g_x(d),   g_x(d) = exp(-|d|^2 / (2 v(x))),  m = 0 off the grid.
    This is the per-pixel weight map the paper multiplies e_tq with: the prompted activation m, smoothed and
    spread ("enlarge the prompted space") by an amount the model sets per pixel ("with uncertainty").
        e_G = max(e_tq * k_G, e_tq)      (k_G broadcast over the L channels);   output = e_G * e_t.
    Since k_G >= 0, max(e_tq k_G, e_tq) = e_tq max(k_G, 1) where e_tq >= 0 and e_tq min(k_G, 1) where
    e_tq < 0: the mask amplifies positive activations where k_G > 1 and damps negative ones where k_G < 1.

What is computed, and what is not. Nothing N x N is materialised (nor the public code's per-token L x L outer
products, (B, 4096, 256, 256) floats, 1 GiB a sample). With the repeated prompt rows, w [e_t; p1; p2] =
w_t e_t + a1 p1^T + a2 p2^T, where w_t is w's first N x N block and a1, a2 are the row sums of its other two
blocks: the function depends on w only through (w_t, a1, a2), so those are the parameters (`load_full_weight`
maps any full w onto them, `full_weight` gives back one). The convolution is linear in M and M is linear in
e_q, so Conv(M) is a k x k convolution of the query map e_q (L channels) with input-dependent weights
U[c, d] = sum_i W[c, i, d] (w [e_t; p1; p2])_i / sqrt(L) (2 k^2 vectors of width L), exactly (zero padding of
M is zero padding of e_q). Cost: O(k^2 N (N + L)) for the weights, O(k^2 N L) for the convolution.
The largest tensor of a call is therefore one N x L map, not M's N x N nor the outer products' N x L x L
(tests/test_oneprompt_model.py tracks the live tensors op by op).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PromptParser(nn.Module):
    def __init__(self, dim: int, grid_size: Tuple[int, int], conv_kernel: int = 3, gauss_radius: int = 3,
                 min_variance: float = 0.25) -> None:
        """
        dim: token width L.
        grid_size: (h, w) of the token grid; N = h * w is fixed (w in R^{N x 3N} depends on it).
        conv_kernel: k of the convolution projecting M to the 2-channel (mean, variance) map.
        gauss_radius: R, the Gaussian smoothing window is (2R + 1)^2 grid cells.
        min_variance: v_min in grid cells^2 (the narrowest Gaussian, sigma = 0.5 cell by default).
        """
        super().__init__()
        if conv_kernel % 2 != 1:
            raise ValueError(f"conv_kernel must be odd, got {conv_kernel}")
        self.dim = dim
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        n = self.grid_size[0] * self.grid_size[1]
        self.num_tokens = n
        self.conv_kernel = conv_kernel
        self.gauss_radius = gauss_radius
        self.min_variance = min_variance
        # w = [w_t | w_1 | w_2]; only w_t and the row sums a = (w_1 1, w_2 1) matter (module docstring).
        # Initialised to w_t = I, a = 1: row i of w [e_t; p1; p2] starts as e_t_i + p1 + p2, so M starts as the
        # prompted template's similarity to the query, position by position.
        self.w_template = nn.Parameter(torch.eye(n))
        self.w_prompt = nn.Parameter(torch.ones(n, 2))
        # Conv(M): N channels -> (mean, variance), a k x k kernel over the query grid.
        self.mask_conv = nn.Conv2d(n, 2, conv_kernel, padding=conv_kernel // 2)
        offsets = torch.arange(-gauss_radius, gauss_radius + 1, dtype=torch.float32)
        dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).flatten()  # |d|^2 in unfold order
        self.register_buffer("window_dist2", dist2, persistent=False)

    # -- the paper's w, for checking and for loading ---------------------------------------------------------
    def load_full_weight(self, w: Tensor) -> None:
        """Set the parameters from a full w in R^{N x 3N} (eq. 2)."""
        n = self.num_tokens
        if tuple(w.shape) != (n, 3 * n):
            raise ValueError(f"w must be ({n}, {3 * n}), got {tuple(w.shape)}")
        with torch.no_grad():
            self.w_template.copy_(w[:, :n])
            self.w_prompt.copy_(torch.stack([w[:, n:2 * n].sum(1), w[:, 2 * n:].sum(1)], dim=1))

    def full_weight(self) -> Tensor:
        """One full w in R^{N x 3N} computing the same function (prompt blocks spread evenly over columns)."""
        n = self.num_tokens
        a = self.w_prompt.detach() / n
        return torch.cat([self.w_template.detach(), a[:, :1].expand(n, n), a[:, 1:].expand(n, n)], dim=1)

    # -- the steps ------------------------------------------------------------------------------------------
    def conv_of_m(self, e_t: Tensor, e_q: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
        """Conv(M) of eq. (3), (B, 2, h, w), without forming M (module docstring)."""
        b, n, dim = e_t.shape
        h, w = self.grid_size
        k = self.conv_kernel
        # mask_conv.weight (2, N, k, k) -> rows (c, dy, dx), columns the N channels of M.
        w_conv = self.mask_conv.weight.permute(0, 2, 3, 1).reshape(2 * k * k, n)
        mix_template = w_conv @ self.w_template  # (2k^2, N): parameters only
        mix_prompt = w_conv @ self.w_prompt  # (2k^2, 2)
        # U = w_conv (w_t e_t + a1 p1^T + a2 p2^T): (B, 2k^2, L).
        u = torch.matmul(mix_template, e_t)
        u = u + mix_prompt[None, :, :1] * p1 + mix_prompt[None, :, 1:] * p2
        u = u * (1.0 / math.sqrt(dim))
        # Per-sample k x k convolution of the query map with weights U: one grouped convolution.
        weight = u.reshape(b, 2, k, k, dim).permute(0, 1, 4, 2, 3).reshape(b * 2, dim, k, k)
        query_map = e_q.transpose(1, 2).reshape(1, b * dim, h, w)
        out = F.conv2d(query_map, weight, padding=k // 2, groups=b).reshape(b, 2, h, w)
        return out + self.mask_conv.bias.reshape(1, 2, 1, 1)

    def gaussian_weight(self, mean_var: Tensor) -> Tensor:
        """(B, 2, h, w) raw (mean, variance) -> k_G, (B, N) per-pixel weights (module docstring)."""
        mean = F.softplus(mean_var[:, :1])  # (B, 1, h, w)
        var = F.softplus(mean_var[:, 1]).flatten(1) + self.min_variance  # (B, N)
        size = 2 * self.gauss_radius + 1
        neighbours = F.unfold(mean, size, padding=self.gauss_radius)  # (B, size^2, N), zero off the grid
        kernel = torch.exp(-self.window_dist2[None, :, None].to(var.dtype) / (2 * var[:, None, :]))
        return (kernel * neighbours).sum(1) / kernel.sum(1)

    def forward(self, e_t: Tensor, e_q: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
        """e_t, e_q (B, N, L) template and query tokens (row-major over the grid); p1, p2 (B or 1, 1, L)
        -> (B, N, L)."""
        if e_t.shape[1] != self.num_tokens or e_q.shape != e_t.shape:
            raise ValueError(f"expected (B, {self.num_tokens}, L) template and query tokens, got "
                             f"{tuple(e_t.shape)} and {tuple(e_q.shape)}")
        p1, p2 = p1.expand(e_t.shape[0], 1, -1), p2.expand(e_t.shape[0], 1, -1)
        k_g = self.gaussian_weight(self.conv_of_m(e_t, e_q, p1, p2)).unsqueeze(-1)  # (B, N, 1)
        e_tq = e_t * (p1 + p2 + e_q)  # (1)
        e_g = torch.maximum(e_tq * k_g, e_tq)  # (3)
        return e_g * e_t
