"""SAMauto (SAM^Med; Wang et al., arXiv 2023) on a volume: SAP-Net's coarse mask places the prompts, SAM draws
the mask.

1. Coarse: on every slice, SAP-Net's foreground log-odds on the 64x64 embedding grid, mapped to the slice (the
   whole slice is the model frame, as when SAP-Net learned). No slice needs a click.
2. Post-processing: the paper keeps the top-K largest 3D components of the coarse volume. When the annotated slices
   are known (they are: SAP-Net learned from them) the components are anchored on them: the K largest of those
   that hold annotated foreground: the largest coarse component can be a false blob on the empty slices above the
   head, which the paper's rule alone keeps (README, SAMauto).
3. Refinement: each slice with coarse foreground gets a prompt made from its coarse mask and SAM decodes it on the
   same cached embedding: a box around the coarse mask, padded as the app pads boxes (MedSAM was trained on
   outward-jittered boxes), and/or foreground points inside it (and background points around it) for a learned
   prompt encoder (SAMassist; vanilla LiteMedSAM ignores points). SAM's and SAP-Net's probabilities are averaged
   (see AutoSegmentSettings.combine), and only components overlapping the coarse mask are kept: the box may cover
   a neighbouring structure. Annotated slices keep their annotation.

Independent of MONAI Label: the caller passes the models and a cached `embed(k)`; the result is a slice stack
(slices, rows, cols) that `stack_to_volume` puts back into voxel order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from lib.sammed.samassist import sample_points
from lib.sammed.sapnet import SAPNet, keep_largest_components
from lib.core.transforms.geometry import ModelFrame, Window
from lib.core.predictor import PredictorSettings

REFINEMENTS = ("none", "box", "points", "box+points")
COMBINATIONS = ("mean", "sam")


@dataclass(frozen=True)
class AutoSegmentSettings:
    top_k: int = 1  # 3D components kept from the coarse volume: the number of separate objects of the label
    # How SAM is prompted from the coarse mask: "none" returns the coarse mask itself; a box scored best (README,
    # SAMauto: how the defaults were chosen).
    refine: str = "box"
    # Model-frame pixels per side, as for a user's box.
    box_padding: float = PredictorSettings.box_padding
    points: int = 3  # foreground (and as many background) points, for "points" / "box+points"
    # Slices whose coarse mask is smaller than this (slice pixels) are left empty: a box around a few pixels at
    # the structure's tip is SAM's cue to segment whatever is there.
    min_coarse_pixels: int = 10
    # "mean": the final mask is where the mean of SAM's and SAP-Net's foreground probabilities exceeds 0.5 (the sum
    # of their log-odds is positive); "sam": SAM's mask alone. Per slice SAM is the better one where SAP-Net
    # under-segments (the structure's ends), SAP-Net in the middle; their mean is close to the better of the two everywhere.
    combine: str = "mean"
    keep_overlapping: bool = True  # keep only the final mask's components that overlap the coarse mask
    seed: int = 0

    def __post_init__(self):
        if self.refine not in REFINEMENTS:
            raise ValueError(f"refine must be one of {REFINEMENTS}, got {self.refine!r}")
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got {self.combine!r}")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")


@dataclass
class AutoSegmentation:
    labels: np.ndarray  # (slices, rows, cols) uint8, 1 = the structure; slices outside the range are 0
    coarse: np.ndarray  # (slices, rows, cols) bool, SAP-Net's mask after the top-K post-processing
    slices: list = field(default_factory=list)  # per refined slice: index, coarse and final pixels, box, IoU
    seconds: dict = field(default_factory=dict)  # coarse, refine


def coarse_logits(sapnet: SAPNet, embedding: torch.Tensor, frame: ModelFrame) -> torch.Tensor:
    """SAP-Net's (H, W) foreground log-odds on a whole slice from its (1, 256, 64, 64) embedding (> 0: foreground)."""
    with torch.inference_mode():
        logits = sapnet.foreground_logits(embedding.to(sapnet.prototypes.device, sapnet.prototypes.dtype))
    return frame.logits_to_window(logits[0]).cpu()


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(row0, col0, row1, col1), inclusive, of a non-empty (H, W) mask."""
    rows, cols = np.nonzero(mask)
    return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())


def prompts_from_mask(mask: np.ndarray, frame: ModelFrame, settings: AutoSegmentSettings,
                      rng: np.random.Generator) -> dict:
    """Model-frame prompts for SAM from a coarse slice mask: a padded box and/or n foreground points near the
    mask's centre(s) and n background points in a ring around it. Also the slice box (row0, col0, row1, col1)."""
    box_rc = mask_box(mask)
    prompts = {"box_rc": box_rc, "boxes": None, "point_coords": None, "point_labels": None}
    if settings.refine in ("box", "box+points"):
        padded = frame.box_to_model(box_rc) + np.array([-1, -1, 1, 1], np.float32) * settings.box_padding
        prompts["boxes"] = torch.as_tensor(padded[None])
    if settings.refine in ("points", "box+points"):
        n = settings.points
        # Background points close to the object tell SAM where it ends; far ones say little.
        ring = ndimage.binary_dilation(mask, iterations=8) & ~ndimage.binary_dilation(mask, iterations=2)
        fg = sample_points(mask, n, "center", rng)
        bg = sample_points(ring if ring.any() else ~mask, n, "uniform", rng)
        points = np.concatenate([fg, bg])
        prompts["point_coords"] = torch.as_tensor(frame.points_to_model(points)[None])
        prompts["point_labels"] = torch.as_tensor([[1] * len(fg) + [0] * len(bg)])
    return prompts


def refine_slice(model, embedding: torch.Tensor, frame: ModelFrame, coarse: np.ndarray, coarse_log_odds: torch.Tensor,
                 settings: AutoSegmentSettings, rng: np.random.Generator, prompt_encoder=None) -> tuple[np.ndarray, dict]:
    """The final (H, W) mask of one whole slice: SAM prompted from its coarse mask, combined with SAP-Net's log-odds
    as settings.combine says; and what was done."""
    prompts = prompts_from_mask(coarse, frame, settings, rng)
    with torch.inference_mode():
        logits, iou = model.decode(embedding, point_coords=prompts["point_coords"], point_labels=prompts["point_labels"],
                                   boxes=prompts["boxes"], prompt_encoder=prompt_encoder)
    sam = frame.logits_to_window(logits[0, 0]).cpu()
    mask = ((sam + coarse_log_odds) if settings.combine == "mean" else sam).numpy() > 0
    if settings.keep_overlapping and mask.any():
        components, _ = ndimage.label(mask)
        mask = np.isin(components, np.setdiff1d(np.unique(components[coarse]), [0]))
    return mask, {"box_rc": [round(v, 1) for v in prompts["box_rc"]], "predicted_iou": round(float(iou[0, 0]), 4)}


def select_components(coarse: np.ndarray, k: int, annotated: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """The paper's post-processing, the top-K largest 3D components, anchored when the annotations are known: the
    annotated masks are pasted in (they are the truth on their slices) and only components that hold annotated
    foreground compete; without annotations (or if none holds any) the K largest overall."""
    coarse = coarse.copy()
    for index, mask in (annotated or {}).items():
        coarse[index] = mask
    if not annotated:
        return keep_largest_components(coarse, k)
    components, count = ndimage.label(coarse)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    anchored = np.zeros(count + 1, bool)
    for index, mask in annotated.items():
        anchored[np.unique(components[index][np.asarray(mask, bool)])] = True
    anchored[0] = False
    if not anchored.any():
        return keep_largest_components(coarse, k)
    keep = [c for c in np.argsort(-sizes, kind="stable") if anchored[c]][:k]
    return np.isin(components, keep)


def auto_segment(model, sapnet: SAPNet, embed: Callable[[int], torch.Tensor], num_slices: int, slice_shape,
                 prompt_encoder=None, settings: AutoSegmentSettings | None = None,
                 slice_range: tuple[int, int] | None = None, annotated: dict[int, np.ndarray] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> AutoSegmentation:
    """Segment the label SAP-Net learned on every slice of a volume.

    model: the frozen Sam; sapnet: a learned SAP-Net (`load_sapnet`), its prototypes set; prompt_encoder: a learned
    one (SAMassist) or None for the model's own. embed(k): the (1, 256, 64, 64) embedding of the whole slice k (the
    infer task's cached one); it is called again for the slices that are refined, so it should be cached.
    slice_range: [start, stop) of the slices to segment (default all). progress(done, total): after each slice;
    total grows once, when the coarse pass knows how many slices the refinement will visit. annotated: slice index
    -> (H, W) mask, the slices SAP-Net learned from, if the caller has them: they are kept as they are and anchor
    the choice of 3D components (see select_components).
    """
    settings = settings or AutoSegmentSettings()
    shape = tuple(int(v) for v in slice_shape)
    frame = ModelFrame(Window.whole(shape), model.image_size)
    start, stop = slice_range if slice_range is not None else (0, num_slices)
    start, stop = max(0, int(start)), min(num_slices, int(stop))
    coarse = np.zeros((num_slices, *shape), bool)
    t0 = time.perf_counter()
    for done, k in enumerate(range(start, stop), 1):
        coarse[k] = coarse_logits(sapnet, embed(k), frame).numpy() > 0
        if progress:
            progress(done, stop - start)
    coarse = select_components(coarse, settings.top_k, annotated)
    seconds = {"coarse": time.perf_counter() - t0}

    t0 = time.perf_counter()
    labels = np.zeros((num_slices, *shape), np.uint8)
    annotated = annotated or {}
    todo = [k for k in range(start, stop) if k in annotated or coarse[k].sum() >= settings.min_coarse_pixels]
    total = (stop - start) + len(todo)
    rng = np.random.default_rng(settings.seed)
    per_slice = []
    for done, k in enumerate(todo, stop - start + 1):
        if k in annotated:  # an annotation is kept as it is
            mask, info = np.asarray(annotated[k], bool), {"annotated": True}
        elif settings.refine == "none":
            mask, info = coarse[k], {}
        else:
            embedding = embed(k)
            mask, info = refine_slice(model, embedding, frame, coarse[k], coarse_logits(sapnet, embedding, frame),
                                      settings, rng, prompt_encoder)
        labels[k] = mask
        per_slice.append({"slice": k, "coarse_pixels": int(coarse[k].sum()), "pixels": int(mask.sum()), **info})
        if progress:
            progress(done, total)
    seconds["refine"] = time.perf_counter() - t0
    return AutoSegmentation(labels, coarse, per_slice, {k: round(v, 3) for k, v in seconds.items()})


def stack_to_volume(stack: np.ndarray, axis: int) -> np.ndarray:
    """A (slices, rows, cols) stack of slice masks taken across `axis` -> the (I, J, K) volume in voxel order
    (the inverse of extract_slice: a slice's rows run along the later in-plane axis, its columns the earlier)."""
    return np.moveaxis(np.asarray(stack).transpose(0, 2, 1), 0, axis)
