"""What to label next, whatever the model (issue 16): which images still lack a label, which slices of an image are
labelled already, and the rules used while no model exists for the label yet.

- An image is unlabelled *for a label* when it has no final label, or its final label holds no voxel of the
  label's value (a value of None: no voxel at all, MONAI Label's own rule).
- Without a model: the image with the most voxels (the most work the team has not done; on a PACS the biggest
  study), and in an image the slice farthest from the slices already labelled (among the slices that hold any
  image content), or the middle one when none is labelled.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from lib.core.images import load_image


def final_label_path(datastore, image_id: str) -> str:
    try:
        path = datastore.get_label_uri(image_id, "final")
    except Exception:  # a datastore answers "no label" in its own way (an exception, "" or a missing path)
        return ""
    return path if path and os.path.isfile(path) else ""


def label_mask(path: str, value: int | None) -> np.ndarray:
    """The boolean mask of `value` (any non-zero voxel when None) in a label file, in voxel order."""
    array = load_image(path).array[0].numpy()
    return array.round() == value if value is not None else array != 0


def unlabelled_images(datastore, value: int | None) -> list[str]:
    """The datastore's images whose final label holds no voxel of `value`, in id order."""
    out = []
    for image_id in sorted(datastore.list_images()):
        path = final_label_path(datastore, image_id)
        if not path or not label_mask(path, value).any():
            out.append(image_id)
    return out


def slices_holding(mask: np.ndarray, axis: int) -> list[int]:
    """The slices along `axis` of a 3D boolean mask that hold any of it."""
    return np.nonzero(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).any(1))[0].tolist()


def labelled_slices(datastore, image_id: str, value: int | None, axis: int) -> list[int]:
    """The slices along `axis` of an image's final label that hold `value`."""
    path = final_label_path(datastore, image_id)
    if not path:
        return []
    mask = label_mask(path, value)
    if mask.ndim != 3:
        return []
    return slices_holding(mask, axis)


class LabelledSlices:
    """How many slices of the datastore's final labels hold each label value, along an axis (a 2D label counts as
    one slice): what retraining triggers and /info count. Each label file is read once per change (keyed by its
    path, size and modification time)."""

    def __init__(self):
        self._cache: dict[tuple, tuple[bool, dict[int, list[int]]]] = {}
        self._lock = threading.Lock()

    def per_image(self, datastore, value: int, axis: int, is_2d: bool | None = None) -> dict[str, list[int]]:
        """{image id: [slices holding value]} over the images whose final label holds it; is_2d: of that kind of
        image only (a value can mean one thing in 3D labels and another in 2D ones, e.g. an instance id)."""
        out = {}
        for image_id in sorted(datastore.get_labeled_images("final")):
            label_is_2d, found = self._slices(final_label_path(datastore, image_id), axis)
            slices = found.get(int(value))
            if slices and is_2d in (None, label_is_2d):
                out[image_id] = slices
        return out

    def _slices(self, path: str, axis: int) -> tuple[bool | None, dict[int, list[int]]]:
        """(whether the label is 2D, {value: [slices holding it]})."""
        if not path:
            return None, {}
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, axis)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        array = load_image(path).array[0].numpy().round().astype(np.int64)
        if array.ndim == 3:
            stack = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
            found: dict[int, list[int]] = {}
            for k, row in enumerate(stack):
                for value in np.unique(row):
                    if value:
                        found.setdefault(int(value), []).append(k)
        else:
            found = {int(v): [0] for v in np.unique(array) if v}
        with self._lock:
            for old in [k for k in self._cache if k[0] == path]:
                del self._cache[old]
            self._cache[key] = array.ndim != 3, found
        return array.ndim != 3, found


def image_size(datastore, image_id: str) -> tuple[int, ...]:
    """The image's size in voxels, from its header (no pixel data read); an RGB image's channels not counted."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(datastore.get_image_uri(image_id))
    reader.ReadImageInformation()
    return tuple(int(v) for v in reader.GetSize())


def image_voxels(datastore, image_id: str) -> int:
    return int(np.prod(image_size(datastore, image_id)))


def is_volume(datastore, image_id: str) -> bool:
    size = image_size(datastore, image_id)
    return len(size) == 3 and min(size) > 1


def largest_image(datastore, image_ids: list[str]) -> str:
    """The image with the most voxels (ties: the first id)."""
    return max(sorted(image_ids), key=lambda i: image_voxels(datastore, i))


def content_slices(volume: np.ndarray, axis: int) -> list[int]:
    """Slices along `axis` that are not uniform (hold some image content)."""
    stack = np.moveaxis(volume, axis, 0).reshape(volume.shape[axis], -1)
    return np.nonzero(stack.max(1) > stack.min(1))[0].tolist()


def widest_spread_slice(labelled: list[int], candidates: list[int]) -> int:
    """The candidate farthest from every labelled slice (ties: the one nearest the candidates' middle); with nothing
    labelled, the middle candidate."""
    if not candidates:
        raise ValueError("no candidate slice")
    middle = (candidates[0] + candidates[-1]) / 2
    if not labelled:
        return min(candidates, key=lambda k: (abs(k - middle), k))
    labelled = np.asarray(sorted(labelled))
    free = [k for k in candidates if k not in set(labelled.tolist())] or candidates
    return max(free, key=lambda k: (np.abs(labelled - k).min(), -abs(k - middle), -k))
