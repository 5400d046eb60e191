"""How unsure a label's SAMauto model is, from what one SAMauto pass already computes (issue 16): on each slice,
SAP-Net's coarse mask and the SAM-refined mask are two answers to the same question, and where they disagree the
model does not know the structure's extent. No extra model run, no dropout: the score costs nothing beyond the
segmentation the team would look at anyway.

Only the slices where the refined mask holds foreground count (where the model says the structure is, so the
annotator has something to draw); the slices SAMauto learned from (annotated, kept as they are) are labelled and
left out.

- per image: the mean over those slices of 1 − Dice(coarse, refined), a fraction, comparable between images of
  different sizes; 1.0 when the model finds the structure nowhere (it cannot be sure of an image where it sees
  nothing it learned).
- per slice: the number of pixels where the two masks disagree. The team is scored, and served, on the whole
  volume, where every voxel weighs the same: the slice with the most disputed voxels is the one whose label fixes
  most. Ranked by 1 − Dice instead, Next Sample asked for the thin tips past the structure's ends, where a few
  disputed pixels are a large fraction (measured in benchmarks/bench_active_learning.py; README, "What to label
  next").
"""

from __future__ import annotations

import numpy as np


def _scored_slices(refined: np.ndarray, annotated) -> list[int]:
    annotated = set(int(k) for k in annotated)
    return [k for k in range(refined.shape[0]) if k not in annotated and np.asarray(refined[k], bool).any()]


def slice_disagreement(coarse: np.ndarray, refined: np.ndarray, annotated=()) -> dict[int, float]:
    """{slice: 1 − Dice(coarse, refined)} for the (slices, rows, cols) stacks, where the refined mask has foreground."""
    out = {}
    for k in _scored_slices(refined, annotated):
        a, b = np.asarray(coarse[k], bool), np.asarray(refined[k], bool)
        out[k] = round(1.0 - 2.0 * int((a & b).sum()) / (int(a.sum()) + int(b.sum())), 4)
    return out


def disagreeing_pixels(coarse: np.ndarray, refined: np.ndarray, annotated=()) -> dict[int, int]:
    """{slice: pixels where coarse and refined differ}, on the same slices as slice_disagreement."""
    return {k: int((np.asarray(coarse[k], bool) ^ np.asarray(refined[k], bool)).sum())
            for k in _scored_slices(refined, annotated)}


def image_uncertainty(per_slice: dict[int, float]) -> float:
    """The image's score from slice_disagreement's map."""
    return round(float(np.mean(list(per_slice.values()))), 4) if per_slice else 1.0
