"""Where a slice's pixels land in One-Prompt's 256 x 256 input, and how predictions go back onto the slice.

The decoder was trained on slices cropped to the image's non-zero box and stretched onto the input (see
`lib.oneprompt.preprocessing`), so its geometry is One-Prompt's own, not the SAM tasks' aspect-preserving
`lib.core.transforms.geometry.ModelFrame`: each axis is scaled on its own, pixel centres onto pixel centres
(align_corners=False), and a prompt must be placed where the trainer placed it, on a pixel of the 256 x 256 mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.images import LoadedImage
from lib.core.transforms.geometry import ModelFrame, Window, crop_window, in_plane_axes
from lib.oneprompt.preprocessing import MASK_INTERPOLATION, SIZE


def slice_window(box: list[tuple[int, int]], axis: int | None) -> Window:
    """The non-zero box (`preprocessing.nonzero_box`) seen on a slice across `axis` (None: a 2D image, rows = y,
    cols = x)."""
    if axis is None:
        (c0, c1), (r0, r1) = box[0], box[1]
    else:
        col_axis, row_axis = in_plane_axes(axis)
        (c0, c1), (r0, r1) = box[col_axis], box[row_axis]
    return Window(r0, c0, r1 - r0 + 1, c1 - c0 + 1)


def slice_shape(image: LoadedImage, axis: int | None) -> tuple[int, int]:
    """(rows, cols) of a slice across `axis` (None: the 2D image)."""
    shape = image.spatial_shape
    if axis is None:
        return shape[1], shape[0]
    col_axis, row_axis = in_plane_axes(axis)
    return shape[row_axis], shape[col_axis]


@dataclass(frozen=True)
class SliceFrame:
    """A window of a slice stretched onto the model's size x size input (align_corners=False geometry)."""

    window: Window
    slice_shape: tuple[int, int]  # (rows, cols) of the whole slice
    size: int = SIZE

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

    def box_to_slice(self, box_xy: np.ndarray) -> tuple[float, float, float, float]:
        """Model (x0, y0, x1, y1), first and last model pixels -> slice box (row0, col0, row1, col1), inclusive
        voxels (the inverse of `box_to_model`)."""
        x0, y0, x1, y1 = (float(v) for v in box_xy)
        sr, sc = self.scale
        c0, c1 = x0 / sc + self.window.col0, (x1 + 1) / sc - 1 + self.window.col0
        r0, r1 = y0 / sr + self.window.row0, (y1 + 1) / sr - 1 + self.window.row0
        rows, cols = self.slice_shape
        clip = lambda v, n: float(min(max(v, 0.0), n - 1))
        return clip(r0, rows), clip(c0, cols), clip(max(r1, r0), rows), clip(max(c1, c0), cols)

    def mask_to_model(self, mask_rc: np.ndarray) -> np.ndarray:
        """A (rows, cols) slice mask -> (size, size) uint8, resized as training resized its masks."""
        crop = crop_window(torch.as_tensor(np.asarray(mask_rc, dtype=np.float32))[None], self.window)
        resized = F.interpolate(crop[None], size=(self.size, self.size), mode=MASK_INTERPOLATION)
        return (resized[0, 0] > 0.5).numpy().astype(np.uint8)

    def to_slice(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Model-frame probabilities (..., size, size) -> (..., rows, cols) on the whole slice (0 outside the
        window), bilinear."""
        lead = probabilities.shape[:-2]
        x = probabilities.reshape(-1, 1, self.size, self.size).float()
        x = F.interpolate(x, size=(self.window.height, self.window.width), mode="bilinear", align_corners=False)
        x = x.reshape(*lead, self.window.height, self.window.width)
        # placing window values onto the slice does not depend on how the window was scaled
        return ModelFrame(self.window, self.size).paste(x, self.slice_shape, fill=0.0)
