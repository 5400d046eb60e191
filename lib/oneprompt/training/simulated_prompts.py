"""Prompts simulated on a template's mask, as the One-Prompt supplement (Wu et al., CVPR 2024, section 3.1) trains
with them: the oracle click (the mask pixel farthest from the boundary) and the oracle box (the tightest box), both
jittered with std = level x the target's side (per axis); doodles (positive: strokes along the eroded mask's middle,
negative: a stroke in a band outside the mask, both as sampled points); SegLab: the template mask itself."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from lib.oneprompt.model import Prompt
from lib.oneprompt.model.prompt_encoder import scribble_points

# Prompt jitter (supplement 3.1): std as a fraction of the target's side, for High / Medium / Low prompts.
JITTER_LEVELS = {"oracle": 0.0, "high": 0.06, "medium": 0.15, "low": 0.25}
# Doodles: "0%, 4%, 10%, and 20% variance" for Oracle / High / Medium / Low.
DOODLE_LEVELS = {"oracle": 0.0, "high": 0.04, "medium": 0.10, "low": 0.20}


def oracle_click(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from the boundary."""
    dist = ndimage.distance_transform_edt(np.pad(mask.astype(bool), 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], dtype=np.float32)


def oracle_box(mask: np.ndarray) -> np.ndarray:
    """Tightest box (x0, y0, x1, y1) in pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _sides(mask: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = oracle_box(mask)
    return np.array([x1 - x0 + 1, y1 - y0 + 1], dtype=np.float32)


def jitter_points(points: np.ndarray, mask: np.ndarray, level: float, rng: np.random.Generator,
                  size: int = 256) -> np.ndarray:
    """Gaussian jitter of (K, 2) points, std = level x the target's side on each axis; clipped to the image."""
    if level <= 0:
        return points.astype(np.float32)
    out = points + rng.normal(size=points.shape) * level * _sides(mask)
    return np.clip(out, 0, size - 1).astype(np.float32)


def simulate_click(mask: np.ndarray, level: float = 0.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    rng = rng or np.random.default_rng()
    return jitter_points(oracle_click(mask)[None], mask, level, rng, mask.shape[-1])[0]


def simulate_box(mask: np.ndarray, level: float = 0.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    rng = rng or np.random.default_rng()
    corners = jitter_points(oracle_box(mask).reshape(2, 2), mask, level, rng, mask.shape[-1])
    lo, hi = corners.min(0), corners.max(0)
    return np.concatenate([lo, hi]).astype(np.float32)


def simulate_doodle(mask: np.ndarray, level: float = 0.0, rng: Optional[np.random.Generator] = None,
                    max_points: int = 32):
    """(positive points (P, 2), negative points (N, 2)) as (x, y). Positive: the skeleton of the mask eroded by
    a fifth of its inscribed radius plus the part of its principal axis (through the centroid) inside it (strokes
    drawn along the structure's middle); negative: one stroke in a band
    3-10 px outside the mask, over a random arc of 90-180 degrees around the mask's centre. Points jittered with
    std = level x target side."""
    from skimage.morphology import skeletonize

    rng = rng or np.random.default_rng()
    m = mask.astype(bool)
    size = m.shape[-1]
    inside = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    eroded = inside > max(1.0, 0.2 * inside.max())
    core = eroded if eroded.any() else m
    skel = skeletonize(core)
    # plus a stroke along the structure's principal axis through its centre (a disk's skeleton is one point)
    ys, xs = np.nonzero(core)
    centre = np.array([xs.mean(), ys.mean()])
    cov = np.cov(np.stack([xs, ys])) if len(xs) > 1 else np.eye(2)
    axis = np.linalg.eigh(cov)[1][:, -1]
    for t in np.linspace(-size, size, 4 * size):
        x, y = np.round(centre + t * axis).astype(int)
        if 0 <= x < size and 0 <= y < size and core[y, x]:
            skel[y, x] = True
    if not skel.any():
        skel = np.zeros_like(m)
        x, y = oracle_click(mask).astype(int)
        skel[y, x] = True
    pos = scribble_points(skel, max_points)
    outside = ndimage.distance_transform_edt(~m)
    band = (outside >= 3) & (outside <= 10)
    ys, xs = np.nonzero(band)
    if len(xs):
        cy, cx = np.argwhere(m).mean(0)
        angle = np.arctan2(ys - cy, xs - cx)
        start, width = rng.uniform(-np.pi, np.pi), rng.uniform(np.pi / 2, np.pi)
        keep = np.mod(angle - start, 2 * np.pi) <= width
        stroke = np.zeros_like(m)
        stroke[ys[keep], xs[keep]] = True
        if not stroke.any():
            stroke[ys, xs] = True
        neg = scribble_points(stroke, max_points)
    else:
        neg = np.zeros((0, 2), np.float32)
    if level > 0:
        pos = jitter_points(pos, mask, level, rng, size)
        if len(neg):
            neg = jitter_points(neg, mask, level, rng, size)
    return pos, neg


def make_prompt(kind: str, masks: Sequence[np.ndarray], images: Optional[torch.Tensor] = None,
                level: str = "oracle", rng: Optional[np.random.Generator] = None) -> Prompt:
    """A batched Prompt of one kind for template masks (each (S, S)); level: oracle / high / medium / low."""
    rng = rng or np.random.default_rng()
    if kind == "click":
        pts = np.stack([simulate_click(m, JITTER_LEVELS[level], rng) for m in masks])
        return Prompt.click(torch.from_numpy(pts[:, None]), torch.ones(len(masks), 1, dtype=torch.long))
    if kind == "bbox":
        return Prompt.bbox(torch.from_numpy(np.stack([simulate_box(m, JITTER_LEVELS[level], rng) for m in masks])))
    if kind == "doodle":
        doodles = [simulate_doodle(m, DOODLE_LEVELS[level], rng) for m in masks]
        k = max(len(p) + len(n) for p, n in doodles)
        points = np.zeros((len(masks), k, 2), np.float32)
        labels = -np.ones((len(masks), k), np.int64)
        for b, (p, n) in enumerate(doodles):
            points[b, :len(p)], labels[b, :len(p)] = p, 1
            points[b, len(p):len(p) + len(n)], labels[b, len(p):len(p) + len(n)] = n, 0
        return Prompt.doodle(torch.from_numpy(points), torch.from_numpy(labels))
    if kind == "seglab":
        mask = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
        return Prompt.seglab(mask, images)
    raise ValueError(kind)
