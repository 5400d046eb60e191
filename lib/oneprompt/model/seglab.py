"""SegLab prompt: a discrete autoencoder (dVAE) that turns a template image + its mask into a grid of visual
tokens (One-Prompt supplement, section 3.0.2, after DALL-E's dVAE).

The tokenizer sees the template image (3 channels) concatenated with the mask (1 channel) at 256 x 256 and
gives, per cell of a g x g grid, logits over a codebook of K entries. Training relaxes the choice of entry with
Gumbel-softmax (temperature annealed from tau_start to tau_end, DALL-E's 1 -> 1/16); at eval the choice is hard
(argmax, one code per cell). The decoder reconstructs the MASK from the chosen codebook vectors (the supplement:
"the decoder learns to reconstruct the input segmentation"); the image is context for the tokenizer only.

Defaults are smaller than the paper's (K = 8192 codes on a 14 x 14 grid): K = 512 codes of width 64 on a
16 x 16 grid (16 x 16-pixel cells), 128-wide convolutions on the grid, 0.63 M parameters, so that
`train_seglab` fits a few hundred masks on one CPU thread in under a minute. All are constructor arguments.
`embed(image, mask)` gives the chosen codebook vectors, (B, g * g, D), which the prompt encoder pools into p1 = p2.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegLabAutoencoder(nn.Module):
    def __init__(self, image_size: int = 256, grid_size: int = 16, num_tokens: int = 512, codebook_dim: int = 64,
                 hidden_dim: int = 128, image_chans: int = 3) -> None:
        """
        image_size: side of the square input (image and mask).
        grid_size: g, tokens per side; image_size must be a multiple of it (patch side image_size / g).
        num_tokens: K, the codebook (vocabulary) size.
        codebook_dim: D, the width of a codebook vector.
        hidden_dim: width of the tokenizer's and decoder's convolutions on the token grid.
        image_chans: channels of the template image (concatenated with the 1-channel mask).
        """
        super().__init__()
        if image_size % grid_size:
            raise ValueError(f"image_size {image_size} is not a multiple of grid_size {grid_size}")
        patch = image_size // grid_size
        self.image_size = image_size
        self.grid_size = grid_size
        self.patch_size = patch
        self.num_tokens = num_tokens
        self.codebook_dim = codebook_dim
        self.image_chans = image_chans
        # Patch tokenizer: each cell's pixels (all 4 channels) as one vector, then convolutions on the grid so
        # that a token also sees its neighbours. Cheaper than a stack of strided convolutions from the pixels
        # (which learned no faster here), and every token sees its whole cell from the first layer.
        self.tokenizer = nn.Sequential(
            nn.PixelUnshuffle(patch),
            nn.Conv2d((image_chans + 1) * patch * patch, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.BatchNorm2d(hidden_dim), nn.ReLU(),
            nn.Conv2d(hidden_dim, num_tokens, 1),
        )
        # Logits start 10x the default initialisation's: each cell's code then depends on its content more than
        # on the Gumbel noise from the first step (with near-uniform logits the sampled codes are noise, the
        # decoder learns to ignore them and only a handful of codes survive).
        with torch.no_grad():
            self.tokenizer[-1].weight.mul_(10.0)
            self.tokenizer[-1].bias.mul_(10.0)
        self.codebook = nn.Embedding(num_tokens, codebook_dim)
        # Decoder: convolutions on the grid of codebook vectors, then each cell's vector -> its patch of logits.
        self.decoder = nn.Sequential(
            nn.Conv2d(codebook_dim, hidden_dim, 3, padding=1), nn.BatchNorm2d(hidden_dim), nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.BatchNorm2d(hidden_dim), nn.ReLU(),
            nn.Conv2d(hidden_dim, patch * patch, 1),
            nn.PixelShuffle(patch),
        )

    def _input(self, image: Optional[Tensor], mask: Tensor) -> Tensor:
        """(B, 3, S, S) image in [0, 1] (None: zeros) and (B, 1, S, S) or (B, S, S) mask -> (B, 4, S, S)."""
        if mask.ndim == 3:
            mask = mask[:, None]
        mask = mask.to(self.codebook.weight.dtype)
        if tuple(mask.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size} x {self.image_size} masks, got {tuple(mask.shape)}")
        if image is None:
            image = mask.new_zeros(mask.shape[0], self.image_chans, *mask.shape[-2:])
        return torch.cat([image.to(mask.dtype), mask], dim=1)

    def token_logits(self, image: Optional[Tensor], mask: Tensor) -> Tensor:
        """-> (B, K, g, g) logits over the codebook."""
        return self.tokenizer(self._input(image, mask))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, K, g, g) code weights (one-hot or relaxed) -> (B, 1, S, S) mask logits."""
        z = torch.einsum("bkhw,kd->bdhw", codes, self.codebook.weight)
        return self.decoder(z)

    def forward(self, image: Optional[Tensor], mask: Tensor, tau: float = 1.0,
                hard: Optional[bool] = None) -> tuple[Tensor, Tensor]:
        """Reconstructed mask logits (B, 1, S, S) and the token logits (B, K, g, g). Training mode samples
        relaxed codes (Gumbel-softmax at temperature tau; hard=True: straight-through one-hot); eval mode (or
        hard=None outside training) takes each cell's argmax code."""
        logits = self.token_logits(image, mask)
        if self.training:
            codes = F.gumbel_softmax(logits, tau=tau, hard=bool(hard), dim=1)
        else:
            codes = F.one_hot(logits.argmax(1), self.num_tokens).permute(0, 3, 1, 2).to(logits.dtype)
        return self.decode_codes(codes), logits

    @torch.no_grad()
    def tokenize(self, image: Optional[Tensor], mask: Tensor) -> Tensor:
        """-> (B, g, g) code indices (hard)."""
        return self.token_logits(image, mask).argmax(1)

    @torch.no_grad()
    def reconstruct(self, image: Optional[Tensor], mask: Tensor) -> Tensor:
        """-> (B, 1, S, S) mask logits decoded from the hard tokens."""
        codes = F.one_hot(self.tokenize(image, mask), self.num_tokens).permute(0, 3, 1, 2)
        return self.decode_codes(codes.to(self.codebook.weight.dtype))

    def embed(self, image: Optional[Tensor], mask: Tensor) -> Tensor:
        """The prompt's token embeddings: codebook vectors of the hard tokens, (B, g * g, D), row-major over
        the grid. No gradient reaches the autoencoder (it is trained separately and frozen)."""
        with torch.no_grad():
            return self.codebook.weight[self.tokenize(image, mask).flatten(1)]


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice per sample, averaged."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    return (1 - (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)).mean()


def train_seglab(masks: Tensor, images: Optional[Tensor] = None, steps: int = 300, batch_size: int = 8,
                 lr: float = 3e-3, tau_start: float = 1.0, tau_end: float = 1.0 / 16, straight_through: bool = False,
                 kl_weight: float = 0.0, model: Optional[SegLabAutoencoder] = None, seed: int = 0,
                 log_every: int = 0) -> SegLabAutoencoder:
    """Fit a SegLab autoencoder to reconstruct `masks` (N, 1, S, S) or (N, S, S) in {0, 1}, with the template
    `images` (N, 3, S, S) in [0, 1] (None: no image channel content). Loss: BCE + Dice of the reconstruction,
    plus kl_weight * KL(token distribution || uniform) (DALL-E's prior term; off by default). The temperature
    falls exponentially from tau_start to tau_end over the steps. straight_through: hard one-hot codes in the
    forward pass with the relaxed gradient, so that training sees what eval uses (better for short runs than
    DALL-E's fully soft relaxation). Random flips augment. Returns the model in eval mode.
    A few hundred 256 x 256 masks, 300 steps of 8 on one CPU thread: about a minute."""
    if masks.ndim == 3:
        masks = masks[:, None]
    masks = masks.float()
    generator = torch.Generator().manual_seed(seed)
    if model is None:
        torch.manual_seed(seed)
        model = SegLabAutoencoder(image_size=masks.shape[-1])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = masks.shape[0]
    start = time.perf_counter()
    for step in range(steps):
        tau = tau_start * (tau_end / tau_start) ** (step / max(steps - 1, 1))
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        mask = masks[idx]
        image = images[idx].float() if images is not None else None
        flips = [d for d in (-1, -2) if torch.rand((), generator=generator) < 0.5]
        if flips:
            mask = mask.flip(flips)
            image = image.flip(flips) if image is not None else None
        recon, logits = model(image, mask, tau=tau, hard=straight_through)
        loss = F.binary_cross_entropy_with_logits(recon, mask) + dice_loss(recon, mask)
        if kl_weight:
            log_q = F.log_softmax(logits, dim=1)
            loss = loss + kl_weight * (log_q.exp() * (log_q + math.log(model.num_tokens))).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"seglab step {step} loss {loss.item():.4f} tau {tau:.3f} {time.perf_counter() - start:.1f}s")
    return model.eval()
