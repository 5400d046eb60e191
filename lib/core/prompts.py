"""What Slicer and OHIF send, turned into a validated prompt on one slice.

Both clients send voxel (IJK) points: `foreground` / `background` lists of [i, j, k] (OHIF v3 and Slicer), a
Slicer ROI as interleaved min/max bounds `roi = [i0, i1, j0, j1, k0, k1]`, and optionally the `slice` index.
2D images take points as [x, y] (a trailing z is ignored) and `roi = [x0, x1, y0, y1]`. Our own extension:
`axis` (0, 1 or 2; default 2, the k axis Slicer's 2D models slice along).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.core.errors import bad_request
from lib.core.requests import as_list, is_finite_number, optional_index, points
from lib.core.transforms.geometry import in_plane_axes, voxel_to_slice

DEFAULT_AXIS = 2


@dataclass(frozen=True)
class SlicePrompt:
    """Prompts on one slice; points are (row, col) slice pixels, the box (row0, col0, row1, col1) inclusive."""

    axis: int | None  # None for 2D images
    index: int | None
    foreground: np.ndarray
    background: np.ndarray
    box: tuple[float, float, float, float] | None


def parse_prompt(request: dict, spatial_shape: tuple[int, ...]) -> SlicePrompt:
    """Validate a request's prompts against the image and place them on a single slice."""
    is_2d = len(spatial_shape) == 2
    ndim = 2 if is_2d else 3
    fg, bg = points(request, "foreground", ndim), points(request, "background", ndim)
    roi = as_list(request.get("roi"), "roi")
    if roi and (len(roi) not in (4, 6) or not all(is_finite_number(v) for v in roi)):
        raise bad_request(f"'roi' must be [i0, i1, j0, j1, k0, k1] (or [x0, x1, y0, y1] on 2D images), got {roi!r}")
    if roi and len(roi) == 4 and not is_2d:
        raise bad_request("'roi' on a 3D volume needs 6 values [i0, i1, j0, j1, k0, k1]")
    if not len(fg) and not roi:
        raise bad_request("no prompt: give at least one 'foreground' point or a box 'roi'")

    for name, pts in (("foreground", fg), ("background", bg)):
        for p in pts:
            for axis, size in enumerate(spatial_shape):
                if not 0 <= p[axis] <= size - 1:
                    raise bad_request(
                        f"'{name}' point {[round(v, 2) for v in p[:ndim]]} is outside the image of shape {list(spatial_shape)}")

    axis = None if is_2d else optional_index(request, "axis")
    axis = DEFAULT_AXIS if (axis is None and not is_2d) else axis
    if axis is not None and axis not in (0, 1, 2):
        raise bad_request(f"'axis' must be 0, 1 or 2, got {axis}")

    box_bounds = None
    if roi:
        bounds = np.asarray(roi, dtype=np.float64).reshape(-1, 2)
        bounds = np.sort(bounds, axis=1)  # an IJK flip in the RAS->IJK matrix can swap min and max
        for a, (lo, hi) in enumerate(bounds):
            if hi < 0 or lo > spatial_shape[a] - 1:
                raise bad_request(f"'roi' {roi} lies outside the image of shape {list(spatial_shape)}")
        box_bounds = np.clip(bounds, 0, np.asarray(spatial_shape)[: len(bounds), None] - 1)

    index = None
    if not is_2d:
        index = optional_index(request, "slice")
        if index is None:
            # The slice the user is working on: the newest click, else the centre of the ROI.
            if len(fg):
                index = int(round(fg[-1][axis]))
            elif box_bounds is not None:
                index = int(round(box_bounds[axis].mean()))
        if not 0 <= index < spatial_shape[axis]:
            raise bad_request(f"'slice' {index} is outside 0..{spatial_shape[axis] - 1} along axis {axis}")
        # Points on other slices belong to other slices' annotations (Slicer sends them all for 3D models).
        fg = fg[np.round(fg[:, axis]) == index] if len(fg) else fg
        bg = bg[np.round(bg[:, axis]) == index] if len(bg) else bg
        if box_bounds is not None and not box_bounds[axis][0] - 0.5 <= index <= box_bounds[axis][1] + 0.5:
            raise bad_request(f"'roi' {roi} does not contain the prompted slice {index} along axis {axis}")
        if not len(fg) and box_bounds is None:
            raise bad_request(f"no foreground point on slice {index} along axis {axis}")

    box = None
    if box_bounds is not None:
        if is_2d:
            (c0, c1), (r0, r1) = box_bounds[0], box_bounds[1]
        else:
            col_axis, row_axis = in_plane_axes(axis)
            (c0, c1), (r0, r1) = box_bounds[col_axis], box_bounds[row_axis]
        box = (float(r0), float(c0), float(r1), float(c1))

    to_slice = lambda pts: np.asarray([voxel_to_slice(p, axis) for p in pts], dtype=np.float32).reshape(-1, 2)
    return SlicePrompt(axis=axis, index=index, foreground=to_slice(fg), background=to_slice(bg), box=box)
