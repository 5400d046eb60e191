"""Prompt-simulation evaluation on labelled slices: how good a mask does a box or a click give?

Used by the benchmark (benchmarks/eval_prompts.py) and by the tests. Targets are connected components of a
label on a slice, as in the One-Prompt supplement (each component its own target, tiny ones dropped). The
prompts are those of an oracle user: the target's tight bounding box, or one click at its most interior pixel.
The baseline a model must beat is the filled box itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .infers.prompts import SlicePrompt


@dataclass
class Target:
    name: str
    mask: np.ndarray  # (rows, cols) bool

    @property
    def box(self) -> tuple[float, float, float, float]:
        rows, cols = np.nonzero(self.mask)
        return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())

    @property
    def interior_point(self) -> tuple[float, float]:
        """The pixel farthest from the target's border: where a person clicks to say "this one"."""
        distance = ndimage.distance_transform_edt(np.pad(self.mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
        return float(r), float(c)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def component_targets(label: np.ndarray, values=None, min_area: int = 20, name: str = "") -> list[Target]:
    """Each connected component of each label value on a (rows, cols) slice, largest first."""
    targets = []
    for value in values if values is not None else sorted(set(np.unique(label)) - {0}):
        components, count = ndimage.label(label == value)
        for n in range(1, count + 1):
            mask = components == n
            if mask.sum() >= min_area:
                targets.append(Target(f"{name}{value}#{n}", mask))
    return sorted(targets, key=lambda t: -int(t.mask.sum()))


def filled_box(target: Target, shape) -> np.ndarray:
    r0, c0, r1, c1 = (int(v) for v in target.box)
    out = np.zeros(shape, dtype=bool)
    out[r0 : r1 + 1, c0 : c1 + 1] = True
    return out


def box_prompt(target: Target, axis, index) -> SlicePrompt:
    empty = np.zeros((0, 2), dtype=np.float32)
    return SlicePrompt(axis=axis, index=index, foreground=empty, background=empty, box=target.box)


def click_prompt(target: Target, axis, index) -> SlicePrompt:
    point = np.asarray([target.interior_point], dtype=np.float32)
    return SlicePrompt(axis=axis, index=index, foreground=point, background=np.zeros((0, 2), np.float32), box=None)
