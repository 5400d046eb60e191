"""How a slice becomes One-Prompt's 256 x 256 encoder input: one module for the training data and for serving.

The decoder learns from slices preprocessed as the One-Prompt supplement (Wu et al., CVPR 2024, section 1.2)
describes, and a served slice must reach it preprocessed the same way, or the decoder sees inputs unlike any it
was trained on. The steps, each defined once here:
  1. intensities normalised per volume (or 2D image) by the rules of its modality and z-scored, with statistics
     of the whole image (`lib.core.transforms.intensity`; serving reads them from `LoadedImage.intensity`);
  2. a crop to the bounding box of the image's non-zero voxels (`nonzero`: CT air at -1024 HU is kept, zero
     padding is not), the same box for every slice of a volume;
  3. volumes sliced across `slicing_axes`;
  4. each cropped slice stretched to SIZE x SIZE ("uniformly": not aspect-preserving), bicubic with
     anti-aliasing for images, nearest-exact for masks;
  5. `to_unit`: min-max to [0, 1] per slice, grey levels repeated to 3 channels.
`lib.oneprompt.dataset` applies 1-4 to whole volumes as MONAI dictionary transforms and the feature cache applies 5;
`model_input` applies all five to one slice of a loaded image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from monai.transforms import Resize, Resized

from lib.core.images import LoadedImage
from lib.core.transforms.geometry import crop_window, extract_slice
from lib.core.transforms.intensity import IntensityRange, apply_intensity_range

if TYPE_CHECKING:
    from lib.oneprompt.frame import SliceFrame

SIZE = 256  # the encoder's input side (LiteMedSAM's TinyViT), and the side of every training sample
IMAGE_INTERPOLATION = "bicubic"  # images are resized with anti-aliasing
MASK_INTERPOLATION = "nearest-exact"  # masks and labels, without


def nonzero(x):
    """The voxels the crop keeps (MONAI CropForeground's `select_fn`)."""
    return x != 0


def nonzero_box(image: LoadedImage) -> list[tuple[int, int]]:
    """(first, last) voxel index of the image's non-zero region along each spatial axis (any channel), the box
    CropForeground(select_fn=nonzero) crops to; the whole extent when the image is all zero."""
    occupied = (image.array != 0).any(dim=0)
    box = []
    for axis, size in enumerate(image.spatial_shape):
        others = tuple(a for a in range(occupied.ndim) if a != axis)
        hits = torch.nonzero(occupied.amax(dim=others) if others else occupied).flatten()
        box.append((int(hits.min()), int(hits.max())) if len(hits) else (0, size - 1))
    return box


def slicing_axes(spacing: Sequence[float], policy: str = "supplement") -> tuple[int, ...]:
    """Voxel axes to slice across. "supplement": the one whose two partners have the highest resolution, i.e. the
    coarsest axis; ties (isotropic volumes) go to the last axis (the first in ITK's (z, y, x) order, whose two
    trailing axes then span the slice). "all": every axis (the supplement's "mid-slice ... along all axes")."""
    if policy == "all":
        return (0, 1, 2)
    if policy != "supplement":
        raise ValueError(f"axes policy must be 'supplement' or 'all', got {policy!r}")
    spacing = np.asarray(spacing, dtype=np.float64)
    rounded = np.round(spacing / spacing.min(), 2)  # 1% tolerance: 1.0 and 1.0000001 mm are the same
    return (max(range(3), key=lambda a: (rounded[a], a)),)


def resize_slices(keys: Sequence[str], size: int = SIZE, mask_keys: Sequence[str] = ()) -> Resized:
    """Step 4 as a dictionary transform: `keys` are images, `mask_keys` labels."""
    keys, mask_keys = list(keys), list(mask_keys)
    return Resized(keys + mask_keys, spatial_size=(size, size),
                   mode=(IMAGE_INTERPOLATION,) * len(keys) + (MASK_INTERPOLATION,) * len(mask_keys),
                   anti_aliasing=(True,) * len(keys) + (False,) * len(mask_keys))


def to_unit(image: np.ndarray) -> np.ndarray:
    """A z-scored (C, S, S) image -> [0, 1] by its own min and max (MedSAM's per-image min-max), 3 channels."""
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def model_input(image: LoadedImage, axis: int | None, index: int | None, intensity: IntensityRange,
                frame: SliceFrame) -> torch.Tensor | None:
    """The (3, size, size) encoder input in [0, 1] of one slice (`frame.window`: the non-zero box on it), or None
    when the cropped slice is uniform (nothing to segment there: the caller predicts an empty mask without running
    the encoder)."""
    channels = image.array[:3] if image.is_rgb else image.array[:1]
    crop = crop_window(extract_slice(channels, axis, index), frame.window)
    if float(crop.max()) == float(crop.min()):
        return None
    z = apply_intensity_range(crop, intensity, "zscore")
    z = Resize((frame.size, frame.size), mode=IMAGE_INTERPOLATION, anti_aliasing=True)(z)
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    return torch.from_numpy(to_unit(z.numpy()))
