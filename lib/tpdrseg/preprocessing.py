"""Fundus image <-> TP-DRSeg's square model input: ONE geometry for training (the CLI trainer and the train task) and
serving, so that the served model sees images exactly as it was trained on them.

Images: grey is repeated to RGB, the image is padded bottom/right to a square with zeros (black, as the fundus
surround), then area-resized to the model's side (each model pixel the mean of its source block, so nothing
aliases; bilinear when enlarging). Probabilities come back bilinearly and the padding is cropped, so an answer has
the image's own shape.

Masks: padded the same way, then max-pooled: a model pixel is lesion if ANY of its source pixels is. Microaneurysms
are 40-125 um, 2-5 px on a 512 px photograph (about 25 um/px): an area-fraction threshold of 0.5 would drop the
smallest ones or make them flicker with their sub-pixel position, and a missing microaneurysm is a lost positive of
the rarest class; max-pooling keeps every lesion, at the price of growing edges by at most one source pixel.

Why not lib.core.transforms.geometry.ModelFrame / resize_to_model (the other methods' "longest side to the model
size, pad bottom/right"): they resize first, bilinearly with antialiasing, to rounded (height, width), then pad.
That gives different pixel values from padding first and area-averaging, and the shipped weights were trained on
the area-averaged images; masks have no max-pooled form there either.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def pad_to_square(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(..., rows, cols) -> ((..., side, side), side) with side = max(rows, cols), zeros added bottom/right."""
    rows, cols = x.shape[-2:]
    side = max(rows, cols)
    return F.pad(x, (0, side - cols, 0, side - rows)), side


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, side, side) in [0, 1] -> (N, C, size, size): area mean when shrinking, bilinear when enlarging."""
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    elif x.shape[-1] < size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


def resize_masks(y: torch.Tensor, size: int) -> torch.Tensor:
    """(N, K, side, side) -> (N, K, size, size) float {0, 1}: max-pooled when shrinking, nearest when enlarging."""
    if y.shape[-1] > size:
        y = F.adaptive_max_pool2d(y, (size, size))
    elif y.shape[-1] < size:
        y = F.interpolate(y, size=(size, size), mode="nearest")
    return (y > 0).float()


def model_input(slice_image: torch.Tensor, size: int) -> Tuple[torch.Tensor, int]:
    """(C, rows, cols) in [0, 1] -> ((3, size, size), side of the padded square)."""
    x = slice_image.float()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x, side = pad_to_square(x[:3])
    return resize_images(x[None], size)[0].contiguous(), side


def model_target(masks: np.ndarray, size: int) -> torch.Tensor:
    """(K, rows, cols) bool -> (K, size, size) float {0, 1}, on the grid of `model_input`."""
    y, _ = pad_to_square(torch.as_tensor(np.ascontiguousarray(masks)).float())
    return resize_masks(y[None], size)[0]


def prepare_arrays(images: np.ndarray, masks: np.ndarray, size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """A data set at once: uint8 images (N, H, W, 3), masks (N, K, H, W) -> float images (N, 3, size, size) in
    [0, 1] and masks (N, K, size, size) in {0, 1}, as `model_input` / `model_target` give them one by one."""
    x, _ = pad_to_square(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0)
    y, _ = pad_to_square(torch.from_numpy(np.ascontiguousarray(masks)).float())
    return resize_images(x, size).contiguous(), resize_masks(y, size).contiguous()


def probabilities_back(probs: torch.Tensor, side: int, rows: int, cols: int) -> torch.Tensor:
    """(K, S, S) probabilities -> (K, rows, cols) on the image (bilinear, padding cropped)."""
    if probs.shape[-1] != side:
        probs = F.interpolate(probs[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return probs[:, :rows, :cols]
