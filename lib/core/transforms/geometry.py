"""Slice extraction, cropping and resizing for 2D promptable models, with the geometry kept to map masks back.

Conventions (used everywhere in this package):
- Volumes are channel-first arrays (C, I, J, K) in the file's voxel order, as MONAI's LoadImage returns them;
  2D images are (C, X, Y).
- A slice is shown to the model as a (C, rows, cols) image whose columns run along the first in-plane voxel
  axis and rows along the second (for the usual axial slice: columns = i, rows = j). This is how ITK/SimpleITK
  hand slices to the medical SAM models' training code, and how a 2D PNG is displayed.
- A point on a slice is (row, col) in voxel units; model-frame points are (x, y) = (col, row) scaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The (column, row) voxel axes of a slice taken across `axis` of a 3D volume."""
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    col_axis, row_axis = (a for a in range(3) if a != axis)
    return col_axis, row_axis


def voxel_to_slice(point, axis: int | None) -> tuple[float, float]:
    """(row, col) on the slice of a voxel point (i, j, k); for 2D images (axis None) the point is (x, y[, z])."""
    if axis is None:
        return float(point[1]), float(point[0])
    col_axis, row_axis = in_plane_axes(axis)
    return float(point[row_axis]), float(point[col_axis])


def labels_on_grid(label: np.ndarray, label_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """A 3D `label` (voxel order, with its 4x4 voxel-to-world `label_affine`) resampled onto another image's grid
    (`shape`, `affine`) through both affines (world mm), nearest voxel; 0 outside the label's grid. Same dtype.

    The one way the project carries an atlas onto another study (e.g. Colin27's AAL onto the MNI152 sample image,
    both in MNI space: an approximate truth, used to score, never stored as a label)."""
    from scipy import ndimage

    label = np.asarray(label)
    if label.ndim != 3 or len(shape) != 3:
        raise ValueError(f"labels_on_grid needs 3D volumes, got {label.shape} -> {tuple(shape)}")
    # output voxel -> world -> label voxel; order 0 = nearest voxel, so label values are never mixed
    matrix = np.linalg.inv(np.asarray(label_affine, float)) @ np.asarray(affine, float)
    return ndimage.affine_transform(label, matrix, output_shape=tuple(int(n) for n in shape), order=0,
                                    mode="constant", cval=0)


def to_tensor(image) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(image))


def extract_slice(image, axis: int | None, index: int | None) -> torch.Tensor:
    """(C, rows, cols) slice of a channel-first volume, or the transposed 2D image when axis is None."""
    image = to_tensor(image)
    if axis is None:
        if image.ndim != 3:
            raise ValueError(f"expected a channel-first 2D image (C, X, Y), got shape {tuple(image.shape)}")
        return image.transpose(1, 2)
    if image.ndim != 4:
        raise ValueError(f"expected a channel-first 3D volume (C, I, J, K), got shape {tuple(image.shape)}")
    plane = image.select(axis + 1, int(index))  # (C, col_axis, row_axis)
    return plane.transpose(1, 2)


def paste_slice(mask: np.ndarray, spatial_shape: tuple[int, ...], axis: int | None, index: int | None,
                volume: np.ndarray | None = None) -> np.ndarray:
    """A (rows, cols) slice mask written into `volume` (a new empty label of `spatial_shape` when None) at slice
    `index` along `axis` (None: a 2D image, which the mask covers whole); returns the volume."""
    if volume is None:
        volume = np.zeros(spatial_shape, dtype=mask.dtype)
    if axis is None:
        volume[...] = mask.T
        return volume
    plane = [slice(None)] * 3
    plane[axis] = index
    volume[tuple(plane)] = mask.T  # (rows, cols) -> (col_axis, row_axis), the order of the remaining axes
    return volume


@dataclass(frozen=True)
class Window:
    """A crop of a slice in pixels: rows [row0, row0+height), cols [col0, col0+width); may extend past the edges."""

    row0: int
    col0: int
    height: int
    width: int

    @staticmethod
    def whole(shape: tuple[int, int]) -> "Window":
        return Window(0, 0, int(shape[0]), int(shape[1]))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.row0, self.col0, self.height, self.width


def crop_window(image: torch.Tensor, window: Window) -> torch.Tensor:
    """Crop (C, H, W) to the window, padding with zeros where it extends past the image."""
    _, h, w = image.shape
    if window == Window.whole((h, w)):
        return image
    out = image.new_zeros((image.shape[0], window.height, window.width))
    r0, r1 = max(window.row0, 0), min(window.row0 + window.height, h)
    c0, c1 = max(window.col0, 0), min(window.col0 + window.width, w)
    if r1 > r0 and c1 > c0:
        out[:, r0 - window.row0 : r1 - window.row0, c0 - window.col0 : c1 - window.col0] = image[:, r0:r1, c0:c1]
    return out


@dataclass(frozen=True)
class ModelFrame:
    """How a window of a slice was placed into the model's square input: scaled, then padded bottom/right."""

    window: Window
    size: int  # the model's input side (256 LiteMedSAM, 1024 Meta SAM)

    @property
    def scale(self) -> float:
        return self.size / max(self.window.height, self.window.width)

    @property
    def resized(self) -> tuple[int, int]:
        return (max(1, round(self.window.height * self.scale)), max(1, round(self.window.width * self.scale)))

    def points_to_model(self, rows_cols: np.ndarray) -> np.ndarray:
        """(N, 2) slice (row, col) -> (N, 2) model-frame (x, y)."""
        rc = np.asarray(rows_cols, dtype=np.float32).reshape(-1, 2)
        rh, rw = self.resized
        x = (rc[:, 1] - self.window.col0) * (rw / self.window.width)
        y = (rc[:, 0] - self.window.row0) * (rh / self.window.height)
        return np.stack([x, y], axis=1)

    def box_to_model(self, box_rc: tuple[float, float, float, float]) -> np.ndarray:
        """Slice box (row0, col0, row1, col1), inclusive voxel bounds -> model-frame (x0, y0, x1, y1)."""
        (x0, y0), (x1, y1) = self.points_to_model(np.array([[box_rc[0], box_rc[1]], [box_rc[2], box_rc[3]]]))
        return np.array([x0, y0, x1, y1], dtype=np.float32)

    def logits_to_window(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-frame logits (..., s, s) at any resolution s -> logits over the window (..., height, width)."""
        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        rh, rw = self.resized
        x = x[..., :rh, :rw]
        x = F.interpolate(x, size=(self.window.height, self.window.width), mode="bilinear", align_corners=False)
        return x.reshape(*lead, self.window.height, self.window.width)

    def mask_on_slice(self, logits: torch.Tensor, slice_shape: tuple[int, int]) -> np.ndarray:
        """Model-frame logits (s, s) -> the (H, W) boolean mask on the whole slice."""
        return self.paste(self.logits_to_window(logits) > 0, slice_shape, fill=False).cpu().numpy()

    def paste(self, window_values: torch.Tensor, slice_shape: tuple[int, int], fill=0) -> torch.Tensor:
        """Place window-sized values (..., height, width) onto a full slice (..., H, W)."""
        h, w = slice_shape
        out = window_values.new_full((*window_values.shape[:-2], h, w), fill)
        win = self.window
        r0, r1 = max(win.row0, 0), min(win.row0 + win.height, h)
        c0, c1 = max(win.col0, 0), min(win.col0 + win.width, w)
        if r1 > r0 and c1 > c0:
            out[..., r0:r1, c0:c1] = window_values[..., r0 - win.row0 : r1 - win.row0, c0 - win.col0 : c1 - win.col0]
        return out


def resize_to_model(image: torch.Tensor, frame: ModelFrame) -> torch.Tensor:
    """(C, height, width) window -> (C, size, size): longest side scaled to `size`, zero-padded bottom/right."""
    rh, rw = frame.resized
    x = image.float().unsqueeze(0)
    if (rh, rw) != tuple(image.shape[-2:]):
        # Antialiasing matters when a 512x512 CT slice is shrunk to 256: without it thin structures alias away.
        antialias = rh < image.shape[-2] or rw < image.shape[-1]
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=antialias)
    return F.pad(x, (0, frame.size - rw, 0, frame.size - rh)).squeeze(0)


class RepeatChannelsd(MapTransform):
    """Grey-level (1, H, W) -> (3, H, W): the SAM encoders were trained on RGB."""

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = to_tensor(d[key])
            if image.shape[0] == 1:
                image = image.expand(self.channels, *image.shape[1:]).contiguous()
            elif image.shape[0] != self.channels:
                raise ValueError(f"cannot make {self.channels} channels from {image.shape[0]}")
            d[key] = image
        return d
