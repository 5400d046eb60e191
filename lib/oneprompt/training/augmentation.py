"""The One-Prompt supplement's eight augmentations (Wu et al., CVPR 2024, supplement 1.3) as MONAI dictionary
transforms: applied to the z-scored image and all of that image's masks together (masks: nearest interpolation, no
intensity transforms), seeded, so that a cached view can be rebuilt exactly."""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np
import torch
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandomizableTransform, RandRotated, RandScaleIntensityd,
                              RandSimulateLowResolutiond, RandZoomd)


class RandIntensityInvertd(RandomizableTransform, MapTransform):
    """Flip intensities within the image's own range (the supplement's `1 - image` for [0, 1] images)."""

    def __init__(self, keys, prob: float = 0.15):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for k in self.key_iterator(d):
                x = d[k]
                d[k] = x.max() + x.min() - x
        return d


class ClipToRanged(MapTransform):
    """Clip `keys` to the range recorded in `range_key` (the supplement: after the multiplication, values are
    clipped to their original range)."""

    def __init__(self, keys, range_key: str = "range"):
        super().__init__(keys)
        self.range_key = range_key

    def __call__(self, data):
        d = dict(data)
        lo, hi = d[self.range_key]
        for k in self.key_iterator(d):
            d[k] = d[k].clamp(lo, hi)
        return d


def augment_transforms(image_key: str = "image", mask_key: str = "mask") -> Compose:
    """The eight augmentations on {"image": (C, S, S) z-scored, "mask": (K, S, S) 0/1, "range": (lo, hi)}.
    Probabilities and ranges from the supplement; where it gives a per-sample and a per-modality probability
    (blur 0.15 and 0.5, low resolution 0.25 and 0.5) the per-sample one is used (one modality per task here)."""
    keys = (image_key, mask_key)
    return Compose([
        # 1. rotation, p 0.15, angle U[-25, 25] degrees
        RandRotated(keys, range_x=math.radians(25), prob=0.15, mode=("bilinear", "nearest"),
                    padding_mode=("border", "zeros"), keep_size=True),
        # 2. scaling, p 0.15, factor U[0.7, 1.4] (coordinates multiplied: > 1 zooms in)
        RandZoomd(keys, prob=0.15, min_zoom=0.7, max_zoom=1.4, mode=("bilinear", "nearest"),
                  padding_mode=("edge", "constant"), keep_size=True),
        # 3. Gaussian noise, p 0.15, variance U[0, 0.1] (std up to sqrt(0.1), sampled)
        RandGaussianNoised(image_key, prob=0.15, mean=0.0, std=math.sqrt(0.1), sample_std=True),
        # 4. Gaussian blur, p 0.15, sigma U[0.5, 1.5]
        RandGaussianSmoothd(image_key, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=0.15),
        # 5. intensities: multiply by U[0.65, 1.2] (p 0.15), clipped to the original range; or invert (p 0.15)
        RandScaleIntensityd(image_key, factors=(-0.35, 0.2), prob=0.15),
        ClipToRanged(image_key),
        RandIntensityInvertd(image_key, prob=0.15),
        # 6. low resolution, p 0.25: nearest down-sampling by U[1, 2], cubic up-sampling
        RandSimulateLowResolutiond(image_key, prob=0.25, downsample_mode="nearest", upsample_mode="bicubic",
                                   zoom_range=(0.5, 1.0)),
        # 7. gamma U[0.7, 1.5] on [0, 1]-scaled intensities, p 0.15; and p 0.15 on the inverted image
        RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5)),
        RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5), invert_image=True),
        # 8. spatial flips, p 0.5 along each axis
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
    ])


def seed_of(*parts) -> int:
    """A stable 32-bit seed for a tuple of values (an image key and a view): the same in every run."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def augment(image: np.ndarray, masks: np.ndarray, seed: int, transforms: Optional[Compose] = None):
    """image (C, S, S) z-scored, masks (K, S, S) 0/1 -> the same, augmented together (seeded)."""
    transforms = transforms or augment_transforms()
    transforms.set_random_state(seed=seed)
    img = torch.as_tensor(image, dtype=torch.float32)
    d = transforms({"image": img, "mask": torch.as_tensor(masks, dtype=torch.float32),
                    "range": (float(img.min()), float(img.max()))})
    out_img = torch.as_tensor(d["image"]).float().numpy()
    out_mask = (torch.as_tensor(d["mask"]).numpy() > 0.5).astype(np.uint8)
    return out_img, out_mask
