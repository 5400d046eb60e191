"""How unsure a label's SAMauto model is, from what one SAMauto pass already computes (issue 16): on each slice,
SAP-Net's coarse mask and the SAM-refined mask are two answers to the same question, and where they disagree the
model does not know the structure's extent. No extra model run, no dropout: the score costs nothing beyond the
segmentation the team would look at anyway.

- per slice: 1 − Dice(coarse, refined), over the slices where the refined mask holds foreground (where the model
  says the structure is, so the annotator has something to draw: a tip where only SAP-Net sees a few pixels and SAM
  nothing ranked first on Colin27's putamen, past the structure's end); the slices SAMauto learned from (annotated,
  kept as they are) are left out: they are labelled.
- per image: the mean over those slices; 1.0 when the model finds the structure nowhere (it cannot be sure of an
  image where it sees nothing it learned).
"""

from __future__ import annotations

import numpy as np


def slice_disagreement(coarse: np.ndarray, refined: np.ndarray, annotated=()) -> dict[int, float]:
    """{slice: 1 − Dice(coarse, refined)} for the (slices, rows, cols) stacks, where the refined mask has foreground."""
    annotated = set(int(k) for k in annotated)
    out = {}
    for k in range(coarse.shape[0]):
        if k in annotated:
            continue
        a, b = np.asarray(coarse[k], bool), np.asarray(refined[k], bool)
        total = int(a.sum()) + int(b.sum())
        if b.any():
            out[k] = round(1.0 - 2.0 * int((a & b).sum()) / total, 4)
    return out


def image_uncertainty(per_slice: dict[int, float]) -> float:
    return round(float(np.mean(list(per_slice.values()))), 4) if per_slice else 1.0
