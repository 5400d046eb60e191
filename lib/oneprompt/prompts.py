"""A request's prompt on one slice, as One-Prompt's prompt encoder takes it: one of four kinds, in model pixels.

- click: `foreground` / `background` voxel points (Slicer and OHIF send these; read by lib/core/prompts.py);
- bbox: a box `roi` = [i0, i1, j0, j1, k0, k1] (2D: [x0, x1, y0, y1]);
- doodle: scribbles, as point lists `doodle_foreground` / `doodle_background` (voxel points, like clicks), or as a
  scribble label volume `doodle_label` (a file path, or a label tag of the image in the datastore) whose voxels
  `doodle_fg_value` (default 1) and `doodle_bg_value` (default 2) are the positive and negative strokes;
- seglab: an existing mask, `seglab_label` (a path or a label tag, e.g. "final"), voxels equal to `seglab_value`
  (default: any non-zero). A label file uploaded with the request (MONAI Label puts its path in `label`) serves
  as the doodle or SegLab label when neither is named.
`prompt` forces the kind; otherwise it is read from what the request holds (seglab, doodle, box, then clicks).
The slice is `slice` when given, else where the prompt is (the newest click, the box's centre, the doodle's
points, or the label's largest cross-section).
"""

from __future__ import annotations

import os

import numpy as np

from lib.core.errors import bad_request
from lib.core.transforms.geometry import extract_slice, voxel_to_slice
from lib.core.images import LoadedImage, load_image
from lib.oneprompt.frame import SliceFrame
from lib.core.prompts import parse_prompt
from lib.core.requests import integer, optional_index, points as request_points

KIND_ALIASES = {"click": "click", "clicks": "click", "point": "click", "points": "click", "bbox": "bbox",
                "box": "bbox", "roi": "bbox", "doodle": "doodle", "scribble": "doodle", "scribbles": "doodle",
                "seglab": "seglab", "mask": "seglab", "label": "seglab"}
MAX_DOODLE_POINTS = 64  # per side: the trainer's scribbles are sampled to at most this many points


def uploaded_label(req: dict) -> str | None:
    """The path of a label file uploaded with the request (MONAI Label stores it in `label`), else None."""
    value = req.get("label")
    return value if isinstance(value, str) and os.path.isfile(value) else None


def prompt_kind(req: dict) -> str | None:
    """The kind of prompt the request holds, None when it holds none."""
    requested = req.get("prompt")
    if requested:
        kind = KIND_ALIASES.get(str(requested).strip().lower())
        if kind is None:
            raise bad_request(f"'prompt' must be click, bbox, doodle or seglab, got {requested!r}")
        return kind
    if req.get("seglab_label") not in (None, ""):
        return "seglab"
    if any(req.get(k) not in (None, "", []) for k in ("doodle_foreground", "doodle_background", "doodle_label")):
        return "doodle"
    if uploaded_label(req):
        return "seglab"
    if req.get("roi") not in (None, "", []):
        return "bbox"
    if req.get("foreground") not in (None, "", []):
        return "click"
    return None


def read_prompt_label(req: dict, key: str, image: LoadedImage) -> np.ndarray:
    """The label volume named by `key` (a path; datastore tags are resolved to paths by the app), or the uploaded
    label file; (spatial shape) float array checked against the image."""
    path = req.get(key) or uploaded_label(req)
    if not path or not isinstance(path, str):
        raise bad_request(f"a {key.split('_')[0]} prompt needs '{key}': a label file or a label tag of the image")
    if not os.path.isfile(path):
        raise bad_request(f"'{key}' {path!r} is neither a file nor a label of this image in the datastore")
    label = load_image(path)
    array = label.array[0].numpy()
    if array.shape != image.spatial_shape:
        raise bad_request(f"'{key}' has shape {list(array.shape)}, the image {list(image.spatial_shape)}")
    return np.round(array)


def _largest_slice(mask: np.ndarray, axis: int | None) -> int | None:
    if axis is None:
        return None
    others = tuple(a for a in range(3) if a != axis)
    return int(np.argmax(mask.sum(axis=others)))


def _index(req: dict, image: LoadedImage, axis: int | None, fallback) -> int | None:
    if axis is None:
        return None
    index = optional_index(req, "slice")
    index = fallback() if index is None else index
    if not 0 <= index < image.spatial_shape[axis]:
        raise bad_request(f"'slice' {index} is outside 0..{image.spatial_shape[axis] - 1} along axis {axis}")
    return index


def _slice_of(volume: np.ndarray, axis: int | None, index: int | None) -> np.ndarray:
    """(rows, cols) slice of a spatial array."""
    return extract_slice(volume[None], axis, index)[0].numpy()


def parse_template_prompt(req: dict, image: LoadedImage, axis: int | None, frame: SliceFrame,
                          kind: str | None = None) -> tuple[int | None, dict]:
    """(slice index, prompt) where prompt = {"kind", and "points" (K, 2) model (x, y) + "labels" (K,) 1/0, or
    "box" (4,) model (x0, y0, x1, y1), or "mask" (S, S) uint8}."""
    kind = kind or prompt_kind(req)
    if kind is None:
        raise bad_request("no prompt: give 'foreground' clicks, a box 'roi', a doodle ('doodle_foreground' / "
                          "'doodle_label') or a mask ('seglab_label')")
    ndim = len(image.spatial_shape)
    if kind in ("click", "bbox"):
        if kind == "bbox" and req.get("roi") in (None, "", []):
            raise bad_request("a bbox prompt needs a box 'roi'")
        if kind == "click" and req.get("foreground") in (None, "", []):
            raise bad_request("a click prompt needs at least one 'foreground' point")
        fields = {"foreground": [], "background": []} if kind == "bbox" else {"roi": []}
        prompt = parse_prompt({**req, **fields, "axis": axis}, image.spatial_shape)
        if kind == "bbox":
            r0, c0, r1, c1 = prompt.box
            if r1 - r0 < 1 or c1 - c0 < 1:
                raise bad_request(f"empty box: 'roi' {req.get('roi')} spans no area on slice {prompt.index}")
            return prompt.index, {"kind": "bbox", "box": frame.box_to_model(prompt.box)}
        points = np.concatenate([prompt.foreground, prompt.background]).reshape(-1, 2)
        labels = np.array([1] * len(prompt.foreground) + [0] * len(prompt.background), dtype=np.int64)
        return prompt.index, {"kind": "click", "points": frame.points_to_model(points), "labels": labels}

    if kind == "doodle":
        if req.get("doodle_label") or (uploaded_label(req) and not req.get("doodle_foreground")):
            volume = read_prompt_label(req, "doodle_label", image)
            fg_value, bg_value = integer(req, "doodle_fg_value", 1), integer(req, "doodle_bg_value", 2)
            index = _index(req, image, axis, lambda: _largest_slice(volume == fg_value, axis))
            from lib.oneprompt.model.prompt_encoder import scribble_points  # imported on use: app start stays cheap

            section = _slice_of(volume, axis, index)
            fg, bg = (frame.mask_to_model(section == v) for v in (fg_value, bg_value))
            fg_points, bg_points = scribble_points(fg, MAX_DOODLE_POINTS), scribble_points(bg, MAX_DOODLE_POINTS)
        else:
            fg3, bg3 = request_points(req, "doodle_foreground", ndim), request_points(req, "doodle_background", ndim)
            for name, pts in (("doodle_foreground", fg3), ("doodle_background", bg3)):
                outside = [p for p in pts if any(not 0 <= v <= s - 1 for v, s in zip(p, image.spatial_shape))]
                if outside:
                    raise bad_request(f"'{name}' point {[round(v, 2) for v in outside[0]]} is outside the image of "
                                      f"shape {list(image.spatial_shape)}")
            index = _index(req, image, axis, lambda: int(np.bincount(np.round(fg3[:, axis]).astype(int)).argmax())
                           if len(fg3) else 0)
            on_slice = lambda pts: pts if axis is None else pts[np.round(pts[:, axis]) == index]
            to_model = lambda pts: frame.points_to_model(
                np.array([voxel_to_slice(p, axis) for p in on_slice(pts)], dtype=np.float32).reshape(-1, 2))
            fg_points, bg_points = (_spread(to_model(p)) for p in (fg3, bg3))
        if not len(fg_points):
            raise bad_request(f"the doodle has no positive stroke on slice {index}")
        points = np.concatenate([fg_points, bg_points]).astype(np.float32)
        labels = np.array([1] * len(fg_points) + [0] * len(bg_points), dtype=np.int64)
        return index, {"kind": "doodle", "points": points, "labels": labels}

    if kind == "seglab":
        volume = read_prompt_label(req, "seglab_label", image)
        value = None if req.get("seglab_value") in (None, "") else integer(req, "seglab_value")  # None: non-zero
        mask = volume != 0 if value is None else volume == value
        if not mask.any():
            raise bad_request(f"the SegLab label has no voxel{'' if value is None else f' of value {value}'}")
        index = _index(req, image, axis, lambda: _largest_slice(mask, axis))
        model_mask = frame.mask_to_model(_slice_of(mask.astype(np.float32), axis, index) > 0)
        if not model_mask.any():
            raise bad_request(f"the SegLab label is empty on slice {index}" + ("" if axis is None else
                                                                              f" along axis {axis}"))
        return index, {"kind": "seglab", "mask": model_mask}
    raise bad_request(f"unknown prompt kind {kind!r}")


def _spread(points: np.ndarray, max_points: int = MAX_DOODLE_POINTS) -> np.ndarray:
    if len(points) > max_points:
        points = points[np.linspace(0, len(points) - 1, max_points).round().astype(int)]
    return points


def resolve_label_tags(request: dict, datastore, allow_server_paths: bool = False,
                       keys=("seglab_label", "doodle_label")) -> None:
    """Turn label tags ("final", "original", ...) of the request's image into the label files' paths, in place.
    Anything else is refused (400), without saying whether such a file exists; an absolute path is kept only
    when the server allows server paths."""
    image = request.get("image")
    for key in keys:
        value = request.get(key)
        if not isinstance(value, str) or not value:
            continue
        if allow_server_paths and os.path.isabs(value):
            continue
        try:
            uri = datastore.get_label_uri(image, value)
        except Exception:  # an unknown image or tag
            uri = None
        if not uri or not os.path.isfile(uri):
            raise bad_request(f"'{key}' must be a label tag of this image in the datastore (e.g. 'final'); "
                              f"{value[:80]!r} is not one")
        request[key] = uri
