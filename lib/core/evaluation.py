"""Prompt-simulation evaluation on labelled slices: how good a mask does a box or a click give?

Used by the benchmark (benchmarks/eval_prompts.py) and by the tests. Targets are connected components of a
label on a slice, as in the One-Prompt supplement (each component its own target, tiny ones dropped). The
prompts are those of an oracle user: the target's tight bounding box, or one click at its most interior pixel.
The baseline a model must beat is the filled box itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lib.core.prompts import SlicePrompt


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


def load_slice_targets(image_path: str, label_path: str, modality: str, axis, index, values=None,
                       min_area: int = 20, max_targets: int | None = None, binary: bool = False, ct_window=None):
    """A normalised (C, rows, cols) slice of an image and the targets of its label on that slice, spread over
    sizes when there are more than `max_targets`."""
    from lib.core.transforms import apply_intensity_range, compute_intensity_range, extract_slice
    from lib.core.images import load_image

    image, label = load_image(image_path), load_image(label_path)
    rng = compute_intensity_range(image.array.numpy(), modality, ct_window)
    slice_image = apply_intensity_range(extract_slice(image.array[:3], axis, index), rng, "unit")
    label_slice = extract_slice(label.array[:1], axis, index)[0].numpy().round().astype(int)
    if binary:
        label_slice = (label_slice > 0).astype(int)
    name = os.path.basename(image_path).split(".")[0]
    targets = component_targets(label_slice, values, min_area=min_area, name=f"{name}:")
    if max_targets is not None and len(targets) > max_targets:
        targets = [targets[i] for i in np.linspace(0, len(targets) - 1, max_targets).astype(int)]
    return slice_image, targets


def evaluate_prompts(predictor_for, slice_image, targets, axis, index, cache_key) -> list[dict]:
    """Dice per target for: the filled box, the model on the whole slice, the model with AutoZoom (box), and one
    click. `predictor_for(zoom: bool)` gives a PromptPredictor."""
    rows = []
    shape = tuple(slice_image.shape[-2:])
    whole, zoom = predictor_for(False), predictor_for(True)
    for target in targets:
        row = {"target": target.name, "area": int(target.mask.sum()),
               "filled_box": dice(filled_box(target, shape), target.mask)}
        row["box_whole_slice"] = dice(whole.predict(slice_image, box_prompt(target, axis, index), cache_key)[0], target.mask)
        row["box_zoom"] = dice(zoom.predict(slice_image, box_prompt(target, axis, index), cache_key)[0], target.mask)
        row["click"] = dice(zoom.predict(slice_image, click_prompt(target, axis, index), cache_key)[0], target.mask)
        rows.append(row)
    return rows


def jitter_box(mask: np.ndarray, d_in: float, d_out: float, rng: np.random.Generator) -> tuple[float, ...]:
    """The mask's box with each side moved independently by a uniform offset in [-d_in, d_out] (outwards > 0)."""
    rows, cols = np.nonzero(mask)
    r0, c0, r1, c1 = float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())
    o = rng.uniform(-d_in, d_out, size=4)
    h, w = mask.shape
    r0, c0 = np.clip(r0 - o[0], 0, h - 1), np.clip(c0 - o[1], 0, w - 1)
    r1, c1 = np.clip(r1 + o[2], r0, h - 1), np.clip(c1 + o[3], c0, w - 1)
    return float(r0), float(c0), float(r1), float(c1)


def corrective_click(mask: np.ndarray, predicted: np.ndarray):
    """Where an annotator clicks next: inside the largest error region, at its most interior pixel; a foreground
    click (1) for a missed region, a background click (0) for a false one. None when nothing is wrong."""
    best = None
    for region, label in ((mask & ~predicted, 1), (~mask & predicted, 0)):
        components, count = ndimage.label(region)
        if count:
            sizes = ndimage.sum(region, components, range(1, count + 1))
            n = int(np.argmax(sizes)) + 1
            if best is None or sizes[n - 1] > best[0]:
                best = (sizes[n - 1], Target("error", components == n).interior_point, label)
    return None if best is None else (best[1], best[2])


def corrective_session(predict, target: Target, first: SlicePrompt, max_clicks: int = 5) -> list[float]:
    """An annotator's session on one target: the first prompt (a click or a box), then up to `max_clicks`
    corrective clicks, each at the most interior pixel of the largest error region (foreground for missed tissue,
    background for extra), every click kept with the ones before it, as the CVPR 2025 interactive challenge
    simulates its users. `predict(SlicePrompt) -> mask`. Returns the Dice after the first prompt and after each
    click (a perfect mask is kept for the remaining steps)."""
    fg, bg = [tuple(p) for p in first.foreground], [tuple(p) for p in first.background]
    scores = []
    for _ in range(max_clicks + 1):
        prompt = SlicePrompt(axis=first.axis, index=first.index, foreground=np.asarray(fg, np.float32).reshape(-1, 2),
                             background=np.asarray(bg, np.float32).reshape(-1, 2), box=first.box)
        predicted = predict(prompt)
        scores.append(dice(predicted, target.mask))
        click = corrective_click(target.mask, predicted)
        if click is None:
            scores += [scores[-1]] * (max_clicks + 1 - len(scores))
            break
        (fg if click[1] == 1 else bg).append(click[0])
    return scores


def dsc_auc(scores) -> float:
    """The area under Dice against interaction step (trapezoids, one unit per step), divided by the number of
    steps after the first so that it lies in [0, 1]: the challenge's DSC AUC, normalised."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) < 2:
        return float(scores[0]) if len(scores) else 0.0
    return float(((scores[1:] + scores[:-1]) / 2).sum() / (len(scores) - 1))


def active_validation(predict, target: Target, axis, index, rng: np.random.Generator, max_clicks: int = 5,
                      box_jitter: tuple[float, float] = (5.0, 10.0)) -> list[float]:
    """SAM^Med's active validation: a (jittered) box first, then up to `max_clicks` corrective clicks, each put
    in the largest FN or FP region of the current mask. `predict(SlicePrompt) -> mask`. Returns the Dice after
    the box and after each click."""
    empty = np.zeros((0, 2), np.float32)
    box = jitter_box(target.mask, *box_jitter, rng)
    first = SlicePrompt(axis=axis, index=index, foreground=empty, background=empty, box=box)
    return corrective_session(predict, target, first, max_clicks)


def validate_prompts(predict, slices, rng: np.random.Generator, max_clicks: int = 5) -> dict:
    """What a clinician would get on labelled slices the model did not learn from: one click at the target's
    interior, and active validation (jittered box, then corrective clicks). `predict(slice_image, prompt,
    cache_key) -> mask`; `slices`: (slice_image, target mask, axis, index, cache_key). Mean Dice over slices."""
    click, active = [], []
    for slice_image, mask, axis, index, cache_key in slices:
        target = Target("validation", mask)
        run = lambda prompt: predict(slice_image, prompt, cache_key)
        click.append(dice(run(click_prompt(target, axis, index)), mask))
        active.append(active_validation(run, target, axis, index, rng, max_clicks=max_clicks))
    if not slices:
        return {}
    active_mean = np.mean(np.asarray(active), axis=0)
    return {"slices": len(slices), "one_click_dice": round(float(np.mean(click)), 4),
            "box_dice": round(float(active_mean[0]), 4),
            "box_then_clicks_dice": [round(float(v), 4) for v in active_mean]}
