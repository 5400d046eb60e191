"""How a slice becomes One-Prompt's 256 x 256 input, and how its predictions go back to the slice.

The decoder was trained on slices preprocessed as `lib.oneprompt.dataset` does it (supplement 1.2), so serving
repeats those steps exactly rather than the SAM tasks' aspect-preserving zoom:
  1. the volume's (or 2D image's) intensity range and z-score statistics, computed once on the whole image
     (`LoadedImage.intensity`, the same numbers training used);
  2. a crop to the bounding box of the image's non-zero voxels (MONAI's CropForeground with `x != 0`: CT air at
     -1024 HU is kept, zero padding is not), the same box for every slice of the volume;
  3. the cropped slice z-scored and stretched to 256 x 256 ("uniformly": not aspect-preserving), bicubic with
     anti-aliasing;
  4. min-max to [0, 1] per slice and grey levels repeated to 3 channels (`to_unit` of the trainer).
`SliceFrame` maps slice pixels (row, col) to model pixels (x, y) and model-frame probabilities back onto the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.transforms.geometry import Window, crop_window, extract_slice, in_plane_axes
from lib.core.transforms.intensity import IntensityRange, apply_intensity_range
from lib.core.images import LoadedImage

MODEL_SIZE = 256


def nonzero_box(image: LoadedImage) -> list[tuple[int, int]]:
    """(first, last) voxel index of the image's non-zero region along each spatial axis (any channel);
    the whole extent when the image is all zero."""
    occupied = (image.array != 0).any(dim=0)
    box = []
    for axis, size in enumerate(image.spatial_shape):
        others = tuple(a for a in range(occupied.ndim) if a != axis)
        hits = torch.nonzero(occupied.amax(dim=others) if others else occupied).flatten()
        box.append((int(hits.min()), int(hits.max())) if len(hits) else (0, size - 1))
    return box


def slice_window(box: list[tuple[int, int]], axis: int | None) -> Window:
    """The non-zero box seen on a slice across `axis` (None: a 2D image, rows = y, cols = x)."""
    if axis is None:
        (c0, c1), (r0, r1) = box[0], box[1]
    else:
        col_axis, row_axis = in_plane_axes(axis)
        (c0, c1), (r0, r1) = box[col_axis], box[row_axis]
    return Window(r0, c0, r1 - r0 + 1, c1 - c0 + 1)


@dataclass(frozen=True)
class SliceFrame:
    """A window of a slice stretched onto the model's size x size input (align_corners=False geometry)."""

    window: Window
    slice_shape: tuple[int, int]  # (rows, cols) of the whole slice
    size: int = MODEL_SIZE

    @property
    def scale(self) -> tuple[float, float]:
        """(rows, cols) model pixels per slice pixel."""
        return self.size / self.window.height, self.size / self.window.width

    def points_to_model(self, rows_cols: np.ndarray) -> np.ndarray:
        """(N, 2) slice (row, col) pixel centres -> (N, 2) model (x, y) pixel indices (what the trainer's clicks
        are: a pixel of the 256 x 256 mask)."""
        rc = np.asarray(rows_cols, dtype=np.float32).reshape(-1, 2)
        sr, sc = self.scale
        x = (rc[:, 1] - self.window.col0 + 0.5) * sc - 0.5
        y = (rc[:, 0] - self.window.row0 + 0.5) * sr - 0.5
        return np.clip(np.stack([x, y], axis=1), 0, self.size - 1)

    def box_to_model(self, box_rc: tuple[float, float, float, float]) -> np.ndarray:
        """Slice box (row0, col0, row1, col1), inclusive voxels -> model (x0, y0, x1, y1), the first and last model
        pixels it covers (the trainer's boxes are the tightest box of a 256 x 256 mask)."""
        r0, c0, r1, c1 = box_rc
        sr, sc = self.scale
        x0, x1 = (c0 - self.window.col0) * sc, (c1 - self.window.col0 + 1) * sc - 1
        y0, y1 = (r0 - self.window.row0) * sr, (r1 - self.window.row0 + 1) * sr - 1
        return np.clip(np.array([x0, y0, max(x1, x0), max(y1, y0)], dtype=np.float32), 0, self.size - 1)

    def mask_to_model(self, mask_rc: np.ndarray) -> np.ndarray:
        """A (rows, cols) slice mask -> (size, size) uint8, nearest (as training resized its masks)."""
        crop = crop_window(torch.as_tensor(np.asarray(mask_rc, dtype=np.float32))[None], self.window)
        resized = F.interpolate(crop[None], size=(self.size, self.size), mode="nearest-exact")
        return (resized[0, 0] > 0.5).numpy().astype(np.uint8)

    def to_slice(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Model-frame probabilities (..., size, size) -> (..., rows, cols) on the whole slice (0 outside the
        window), bilinear."""
        lead = probabilities.shape[:-2]
        x = probabilities.reshape(-1, 1, self.size, self.size).float()
        x = F.interpolate(x, size=(self.window.height, self.window.width), mode="bilinear", align_corners=False)
        x = x.reshape(*lead, self.window.height, self.window.width)
        rows, cols = self.slice_shape
        out = x.new_zeros((*lead, rows, cols))
        w = self.window
        out[..., w.row0:w.row0 + w.height, w.col0:w.col0 + w.width] = x  # the window lies inside the slice
        return out


def slice_shape(image: LoadedImage, axis: int | None) -> tuple[int, int]:
    shape = image.spatial_shape
    if axis is None:
        return shape[1], shape[0]
    col_axis, row_axis = in_plane_axes(axis)
    return shape[row_axis], shape[col_axis]


def model_input(image: LoadedImage, axis: int | None, index: int | None, intensity: IntensityRange,
                frame: SliceFrame) -> torch.Tensor | None:
    """The (3, size, size) encoder input in [0, 1] of one slice, or None when the cropped slice is uniform
    (nothing to segment there: the caller predicts an empty mask without running the encoder)."""
    from monai.transforms import Resize

    from lib.oneprompt.training import to_unit  # the trainer's own normalisation: serving must match it

    channels = image.array[:3] if image.is_rgb else image.array[:1]
    crop = crop_window(extract_slice(channels, axis, index), frame.window)
    if float(crop.max()) == float(crop.min()):
        return None
    z = apply_intensity_range(crop, intensity, "zscore")
    z = Resize((frame.size, frame.size), mode="bicubic", anti_aliasing=True)(z)
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    return torch.from_numpy(to_unit(z.numpy()))


def place_on_volume(mask: np.ndarray, image: LoadedImage, axis: int | None, index: int | None,
                    volume: np.ndarray) -> None:
    """Write a (rows, cols) slice mask into `volume` (the image's spatial shape) in place."""
    if axis is None:
        volume[...] = mask.T
        return
    plane = [slice(None)] * 3
    plane[axis] = index
    volume[tuple(plane)] = mask.T  # (rows, cols) -> (col_axis, row_axis) order
