"""One prompted slice -> a whole volume, on the template's own volume or another study (ours, on One-Prompt).

The decoder alone draws the template's structure on nearly every slice (it never learned "absent"), and the volume
gate (`consistent_run` in lib/oneprompt/infer.py) keeps too few or the wrong slices (README, One-Prompt). What does
work here per slice is LiteMedSAM from a box. So a volume is segmented as MedSAM2 propagates a key slice, with
One-Prompt's pieces as the locator and the check:

1. Seed. On the template's own volume, the template slice: SAM from the template's box (a click's or doodle's box
   is that of One-Prompt's own prediction on its slice); a SegLab template is its mask. On another study, the seed
   is looked for on the slices around the template slice's relative position in the body (`relative_position`),
   within `search_fraction` of the body's extent: on each, SAM from two candidate boxes (the box of One-Prompt's
   prediction there, and the template's box copied into the same place of the slice's body box: One-Prompt's frame
   is the body box stretched to 256 x 256, so the same model pixels are the same relative place), and the seed is
   the candidate that scores best in `locate`: looks most like the template's (prototype cosine), near the
   expected slice and at the template box's place.
2. Propagation, both ways from the seed: the next slice is SAM-segmented from the box of the previous mask; only
   components touching the previous mask (dilated by what the structure may move over one slice spacing) are kept.
   Each slice also tries the template's own box at its place (`anchor`), and the more template-like of the two
   masks is kept: where a structure barely moves, that box does not drift onto a neighbour.
3. Stop where the structure ends, by rules in physical units, on the prototype and on intensity, their thresholds
   chosen on TRAINING structures (README, One-Prompt: whole volumes): the mask is smaller than `min_area_mm2`; its
   prototype cosine to the template's falls more than `max_similarity_drop` below the seed's; its mean intensity
   moves more than `max_intensity_shift` standard deviations from the seed's (SAM^Med's propagation criterion);
   or it grows by more than `max_growth` per mm of slice spacing (a leak into a neighbour).

Everything here is in slice pixels (rows, cols of the slice; the physical units come from the voxel spacing). SAM
is the served LiteMedSAM box path (lib/core/predictor.py: a small structure's box is zoomed into, as for a user's
box, which segments better than SAM's decoder on One-Prompt's whole-slice features: README). Independent of MONAI
Label: the caller passes `SliceModels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from scipy import ndimage


@dataclass(frozen=True)
class VolumeSettings:
    # The stop rules' thresholds, chosen on 8 TRAINING AAL structures (README, One-Prompt: whole volumes).
    min_area_mm2: float = 10.0
    max_similarity_drop: float = 0.25  # below the seed's own prototype cosine
    max_growth: float = 1.0  # relative area growth per mm of slice spacing; 1.0 = doubling over 1 mm
    max_intensity_shift: float = 1.25  # in standard deviations of the seed's intensities (SAM^Med's lambda)
    anchor: bool = True  # each slice also tries the template's box at its place; the more template-like mask wins
    search_fraction: float = 0.2  # another study: slices within +-this fraction of the body extent are searched,
    search_step_mm: float = 2.0  # every this many mm (the structures we serve span 10 mm or more)
    locate_distance_weight: float = 0.2  # `locate`'s score; both weights chosen on 8 training structures
    locate_place_weight: float = 0.1
    move_mm: float = 3.0  # how far a structure's outline may move between slices 1 mm apart (dilation of the previous mask)


class SliceModels(Protocol):
    def sam(self, index: int, box_rc: tuple) -> tuple[np.ndarray, float] | None:
        """SAM's (H, W) bool mask on slice `index` from a slice box (row0, col0, row1, col1), and its predicted IoU;
        None for a uniform slice."""

    def oneprompt(self, index: int) -> np.ndarray | None:
        """(H, W) One-Prompt probabilities of the template's structure on the slice; None for a uniform slice."""

    def similarity(self, index: int, mask: np.ndarray) -> float:
        """Prototype cosine of the slice's features under `mask` (H, W) to the template's."""

    def intensity(self, index: int) -> np.ndarray:
        """(H, W) intensities of the slice, normalised per volume (comparable between its slices)."""


@dataclass(frozen=True)
class Geometry:
    """Physical size of a slice pixel (rows, cols) and the slice spacing, in mm."""

    pixel_mm: tuple[float, float]
    spacing_mm: float

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.pixel_mm[0] * self.pixel_mm[1])


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(row0, col0, row1, col1), inclusive, of a non-empty (H, W) mask."""
    rows, cols = np.nonzero(mask)
    return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())


def dilate_mm(mask: np.ndarray, radius_mm: float, geometry: Geometry) -> np.ndarray:
    """`mask` dilated by an ellipse of radius_mm in physical units (pixels need not be square)."""
    ry = max(1, int(round(radius_mm / geometry.pixel_mm[0])))
    rx = max(1, int(round(radius_mm / geometry.pixel_mm[1])))
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    footprint = (y / ry) ** 2 + (x / rx) ** 2 <= 1
    return ndimage.binary_dilation(mask, structure=footprint)


def touching(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The components of `mask` that overlap `region`."""
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    keep = np.setdiff1d(np.unique(components[region & mask]), [0])
    return np.isin(components, keep)


@dataclass
class Step:
    index: int
    mask: np.ndarray  # (H, W) bool, slice pixels
    area_mm2: float
    similarity: float
    predicted_iou: float
    growth: float  # relative area change from the previous slice per mm of spacing
    intensity_shift: float = 0.0  # |mean intensity under the mask - the seed's| in standard deviations of the seed's
    similarity_drop: float = 0.0  # the seed's prototype cosine minus this slice's
    stop: str | None = None  # why propagation stopped here (this slice is then not kept)


def stop_reason(step: Step, settings: VolumeSettings) -> str | None:
    if step.area_mm2 < settings.min_area_mm2:
        return "ended (area)"
    if step.similarity_drop > settings.max_similarity_drop:
        return "ended (not the template's structure)"
    if step.growth > settings.max_growth:
        return "leaked (grew too fast)"
    if step.intensity_shift > settings.max_intensity_shift:
        return "ended (other tissue)"
    return None


def trace(models: SliceModels, seed_index: int, seed_mask: np.ndarray, direction: int, num_slices: int,
          geometry: Geometry, settings: VolumeSettings, stop: Callable[[Step], str | None] | None = None,
          on_slice: Callable[[int], None] | None = None, bounds: tuple[int, int] | None = None,
          anchor_box: tuple | None = None) -> list[Step]:
    """The slices after the seed in `direction` (+1 or -1) until the stop rule fires (that step is included, with
    its reason) or the volume (or `bounds`, [start, stop)) ends. `stop` replaces the settings' rule (the benchmark
    records whole runs with a rule that never fires, then replays rules on them); on_slice(k) before each slice."""
    stop = stop or (lambda s: stop_reason(s, settings))
    lo, hi = bounds or (0, num_slices)
    steps: list[Step] = []
    previous = np.asarray(seed_mask, bool)
    index = seed_index + direction
    reach = settings.move_mm * max(1.0, geometry.spacing_mm)
    inside = models.intensity(seed_index)[previous] if previous.any() else np.zeros(1)
    reference = float(inside.mean()), max(float(inside.std()), 1e-3)
    seed_similarity = models.similarity(seed_index, previous) if previous.any() else 1.0
    while lo <= index < hi:
        if on_slice:
            on_slice(index)
        answer = models.sam(index, mask_box(previous))
        if answer is None:
            steps.append(Step(index, np.zeros_like(previous), 0.0, -1.0, 0.0, 0.0, stop="uniform slice"))
            break
        near = dilate_mm(previous, reach, geometry)
        mask = touching(answer[0], near)
        iou = answer[1]
        similarity = models.similarity(index, mask) if mask.any() else -1.0
        if anchor_box is not None and settings.anchor:  # the template's box at its place: no drift, where the structure barely moves
            anchored, anchored_iou = models.sam(index, anchor_box)
            anchored = touching(anchored, near)
            anchored_similarity = models.similarity(index, anchored) if anchored.any() else -1.0
            if anchored_similarity > similarity:
                mask, iou, similarity = anchored, anchored_iou, anchored_similarity
        area = float(mask.sum()) * geometry.pixel_area_mm2
        previous_area = float(previous.sum()) * geometry.pixel_area_mm2
        growth = (area / max(previous_area, 1e-6) - 1.0) / max(geometry.spacing_mm, 1e-6)
        shift = abs(float(models.intensity(index)[mask].mean()) - reference[0]) / reference[1] if mask.any() else 0.0
        step = Step(index, mask, area, similarity, float(iou), growth, shift, seed_similarity - similarity)
        step.stop = stop(step)
        steps.append(step)
        if step.stop:
            break
        previous, index = mask, index + direction
    return steps


def kept_steps(steps: list[Step], stop: Callable[[Step], str | None]) -> list[Step]:
    """The steps of a recorded run kept under a stop rule: those before the first where it fires."""
    out = []
    for step in steps:
        if step.stop == "uniform slice" or stop(step):
            break
        out.append(step)
    return out


def body_extent(image, axis: int) -> tuple[int, int]:
    """(first, last) slice along `axis` that holds body: voxels brighter than the volume's mean intensity (air,
    background and zero padding are darker) on at least 1% of the slice. `image`: a LoadedImage or a (C, I, J, K)
    array."""
    array = getattr(image, "array", image)
    volume = torch.as_tensor(np.asarray(array[0]) if not isinstance(array, torch.Tensor) else array[0]).float()
    body = volume > volume.mean()
    others = tuple(a for a in range(3) if a != axis)
    fraction = body.float().mean(dim=others)
    hits = torch.nonzero(fraction >= 0.01).flatten()
    if not len(hits):
        return 0, volume.shape[axis] - 1
    return int(hits.min()), int(hits.max())


def relative_position(index: int, extent: tuple[int, int]) -> float:
    """Where a slice lies in the body's extent along the axis, 0 (first) to 1 (last)."""
    first, last = extent
    return (index - first) / max(1, last - first)


def box_iou(a: tuple, b: tuple) -> float:
    """IoU of two (row0, col0, row1, col1) inclusive boxes."""
    rows = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    cols = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return rows * cols / max(1e-6, area(a) + area(b) - rows * cols)


def locate(models: SliceModels, candidates: list[int], copied_box: tuple, centre: float, reach: float,
           settings: VolumeSettings, on_slice: Callable[[int], None] | None = None) -> dict | None:
    """The seed on another study: of the candidate slices, the SAM mask (from the box of One-Prompt's prediction,
    or the copied template box, slice pixels) that scores best: its prototype cosine to the template's, less
    `locate_distance_weight` times its squared distance from the expected slice (`centre`, in units of `reach`),
    plus `locate_place_weight` times its box's IoU with the copied box (the same relative place). The prototype
    alone picked a wrong slice for 3 of 8 training structures on the second study (README). {index, mask,
    similarity, score, source, scores} or None."""
    best, scores = None, {}
    for index in candidates:
        if on_slice:
            on_slice(index)
        probabilities = models.oneprompt(index)
        if probabilities is None:
            continue
        boxes = {"copied box": tuple(copied_box)}
        if (probabilities > 0.5).any():
            boxes["oneprompt"] = mask_box(probabilities > 0.5)
        for source, box in boxes.items():
            mask, _ = models.sam(index, box)
            if not mask.any():
                continue
            similarity = models.similarity(index, mask)
            score = (similarity - settings.locate_distance_weight * ((index - centre) / max(reach, 1e-6)) ** 2
                     + settings.locate_place_weight * box_iou(mask_box(mask), tuple(copied_box)))
            scores[index] = max(scores.get(index, -np.inf), score)
            if best is None or score > best["score"]:
                best = {"index": index, "mask": mask, "similarity": similarity, "score": score, "source": source}
    if best is not None:
        best["scores"] = scores
    return best


def largest_run(masks: dict[int, np.ndarray], seed: int) -> dict[int, np.ndarray]:
    """The 3D component holding the seed slice's mask (MedSAM2 keeps the largest connected component; ours is
    the one grown from the seed), as {slice: mask}."""
    indices = sorted(masks)
    stack = np.stack([masks[i] for i in indices])
    components, count = ndimage.label(stack)
    if count <= 1:
        return masks
    at_seed = components[indices.index(seed)]
    labels = np.setdiff1d(np.unique(at_seed[masks[seed]]), [0])
    keep = np.isin(components, labels)
    return {i: keep[n] for n, i in enumerate(indices) if keep[n].any()}
