"""Training and evaluation of the One-Prompt model (paper 003, supplement sections 1.2, 1.3, 3.1 and 4) on the
multi-task 2D data of `lib.oneprompt.dataset` (data/oneprompt/: shards + manifest.json).

Pieces:
- `SampleStore`: every sample of the shards (images once per image key, masks bit-packed), with task roles and
  modalities from the manifest.
- `augment_transforms`: the supplement's eight augmentations (1.3) as MONAI dictionary transforms, applied to the
  z-scored image and all of that image's masks together (masks: nearest interpolation, no intensity transforms).
- `FeatureCache`: the frozen encoder's features of each (image, view), fp16 `.pt` files under
  `data/oneprompt/features/v<view>/`; view 0 is the clean image, views >= 1 augmented (seeded per image and view).
  The encoder runs once per image and view, not per sample: samples cut from the same slice share one file, which
  also keeps that view's (transformed) masks of every sample on the image. Building is resumable (existing files are
  skipped) and prints progress. Because views are cached, training draws the query's view and the template's view
  independently, which is the supplement's "each augmentation is individually applied to the template sample and
  the query sample" with a finite number of draws.
- prompt simulation (supplement 3.1): oracle click (the mask pixel farthest from the boundary), oracle box (the
  tightest box), both jittered with std = level x the target's side (per axis); doodles: positive = skeleton of the
  eroded mask, negative = a stroke in a band outside the mask, both as sampled points; SegLab: the template mask.
- `TaskSampler`: task (uniform over training tasks), then modality, then sample; the template from the same task's
  template split; a random prompt kind per pair.
- `train_decoder`: class-weighted CE (binary, with logits) + Dice, one prompt kind per batch, AdamW (0.9, 0.999),
  linear warm-up then cosine decay, atomic resumable checkpoints.
- `evaluate`: held-out tasks, per prompt kind, mean Dice of the queries given each template of the task's template
  split, against (a) frozen LiteMedSAM given the template's prompt copied onto the query and (b) a training-free
  prototype baseline (masked average of the template's neck features, cosine similarity on the query's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandomizableTransform, RandRotated, RandScaleIntensityd,
                              RandSimulateLowResolutiond, RandZoomd)
from scipy import ndimage

from lib.oneprompt.dataset import load_shard
from lib.oneprompt.model import OnePromptModel, Prompt, SegLabAutoencoder, masked_prototype, train_seglab
from lib.oneprompt.model.prompt_encoder import PROMPT_KINDS, scribble_points
from lib.oneprompt.model.seglab import dice_loss

FEATURE_NAMES = ("stage1", "stage2", "neck")
# Prompt jitter (supplement 3.1): std as a fraction of the target's side, for High / Medium / Low prompts.
JITTER_LEVELS = {"oracle": 0.0, "high": 0.06, "medium": 0.15, "low": 0.25}
# Doodles: "0%, 4%, 10%, and 20% variance" for Oracle / High / Medium / Low.
DOODLE_LEVELS = {"oracle": 0.0, "high": 0.04, "medium": 0.10, "low": 0.20}


# ---------------------------------------------------------------------------------------------------------------------
# Samples


@dataclass
class StoredSample:
    index: int  # global sample id (manifest shard order, then row)
    task: str
    split: str
    image_key: str
    bits: np.ndarray = field(repr=False)  # (S, S/8) packed mask

    def mask(self, size: int = 256) -> np.ndarray:
        return np.unpackbits(self.bits, axis=-1, count=size)


@dataclass(frozen=True)
class AbsentQuery:
    """A training query on which the task's structure is absent (its target is empty): a slice of the same volume
    and plane that holds none of the structure's voxels."""
    task: str
    image_key: str


class SampleStore:
    """All samples of a built data directory (see lib.oneprompt.dataset)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        with open(os.path.join(data_dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.tasks = {t["id"]: t for t in self.manifest["tasks"]}
        self.images: Dict[str, np.ndarray] = {}
        self.samples: List[StoredSample] = []
        for shard in self.manifest["shards"]:
            a = load_shard(os.path.join(data_dir, shard["file"]))
            keys = [str(k) for k in a["image_keys"]]
            for k, img in zip(keys, a["images"]):
                self.images[k] = img
            for i in range(len(a["sample_task"])):
                self.samples.append(StoredSample(len(self.samples), str(a["sample_task"][i]),
                                                 str(a["sample_split"][i]), keys[int(a["sample_image"][i])],
                                                 a["masks_bits"][i]))
        self.size = int(self.manifest["parameters"]["size"])
        self.by_image: Dict[str, List[int]] = {}
        for s in self.samples:
            self.by_image.setdefault(s.image_key, []).append(s.index)

    @classmethod
    def from_samples(cls, tasks: Dict[str, dict], samples: Sequence[tuple], images: Dict[str, np.ndarray],
                     size: int = 256) -> "SampleStore":
        """An in-memory store (tests): tasks {id: {"role", "modality"}}, samples [(task, split, image_key,
        mask (S, S))], images {image_key: (C, S, S)}."""
        self = cls.__new__(cls)
        self.data_dir, self.manifest, self.size, self.images = None, {}, size, dict(images)
        self.tasks = {t: {"id": t, **info} for t, info in tasks.items()}
        self.samples = [StoredSample(i, t, sp, k, np.packbits(np.asarray(m, np.uint8), axis=-1))
                        for i, (t, sp, k, m) in enumerate(samples)]
        self.by_image = {}
        for s in self.samples:
            self.by_image.setdefault(s.image_key, []).append(s.index)
        return self

    def manifest_hash(self) -> str:
        with open(os.path.join(self.data_dir, "manifest.json"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def role(self, task: str) -> str:
        return self.tasks[task]["role"]

    def modality(self, task: str) -> str:
        return self.tasks[task]["modality"]

    def task_ids(self, role: str) -> List[str]:
        return [t for t, info in self.tasks.items() if info["role"] == role]

    def select(self, task: Optional[str] = None, split: Optional[str] = None) -> List[StoredSample]:
        return [s for s in self.samples if (task is None or s.task == task) and (split is None or s.split == split)]

    def absent_queries(self, slice_values: Dict[str, Sequence[int]]) -> Dict[str, List[AbsentQuery]]:
        """{training task: queries where its structure is absent}: the stored images of the task's volume and plane
        (image keys "<dataset>/<plane>/<slice>") whose label slice has no pixel of the task's value, according to
        `slice_values` (lib.oneprompt.dataset.slice_label_values). Images not in it are skipped (unknown)."""
        out: Dict[str, List[AbsentQuery]] = {}
        for task, info in self.tasks.items():
            if info.get("role") != "train" or "label_value" not in info:
                continue
            prefix = f"{info['dataset']}/{info['plane']}/"
            keys = [k for k in sorted(self.images) if k.startswith(prefix) and k in slice_values
                    and int(info["label_value"]) not in slice_values[k]]
            if keys:
                out[task] = [AbsentQuery(task, k) for k in keys]
        return out

    def image3(self, key: str) -> np.ndarray:
        img = self.images[key]
        return np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation (supplement 1.3)


class RandIntensityInvertd(RandomizableTransform, MapTransform):
    """Flip intensities within the image's own range (the supplement's `1 - image` for [0, 1] images)."""

    def __init__(self, keys, prob: float = 0.15):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for k in self.key_iterator(d):
                x = d[k]
                d[k] = x.max() + x.min() - x
        return d


class ClipToRanged(MapTransform):
    """Clip `keys` to the range recorded in `range_key` (the supplement: after the multiplication, values are
    clipped to their original range)."""

    def __init__(self, keys, range_key: str = "range"):
        super().__init__(keys)
        self.range_key = range_key

    def __call__(self, data):
        d = dict(data)
        lo, hi = d[self.range_key]
        for k in self.key_iterator(d):
            d[k] = d[k].clamp(lo, hi)
        return d


def augment_transforms(image_key: str = "image", mask_key: str = "mask") -> Compose:
    """The eight augmentations on {"image": (C, S, S) z-scored, "mask": (K, S, S) 0/1, "range": (lo, hi)}.
    Probabilities and ranges from the supplement; where it gives a per-sample and a per-modality probability
    (blur 0.15 and 0.5, low resolution 0.25 and 0.5) the per-sample one is used (one modality per task here)."""
    keys = (image_key, mask_key)
    return Compose([
        # 1. rotation, p 0.15, angle U[-25, 25] degrees
        RandRotated(keys, range_x=math.radians(25), prob=0.15, mode=("bilinear", "nearest"),
                    padding_mode=("border", "zeros"), keep_size=True),
        # 2. scaling, p 0.15, factor U[0.7, 1.4] (coordinates multiplied: > 1 zooms in)
        RandZoomd(keys, prob=0.15, min_zoom=0.7, max_zoom=1.4, mode=("bilinear", "nearest"),
                  padding_mode=("edge", "constant"), keep_size=True),
        # 3. Gaussian noise, p 0.15, variance U[0, 0.1] (std up to sqrt(0.1), sampled)
        RandGaussianNoised(image_key, prob=0.15, mean=0.0, std=math.sqrt(0.1), sample_std=True),
        # 4. Gaussian blur, p 0.15, sigma U[0.5, 1.5]
        RandGaussianSmoothd(image_key, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=0.15),
        # 5. intensities: multiply by U[0.65, 1.2] (p 0.15), clipped to the original range; or invert (p 0.15)
        RandScaleIntensityd(image_key, factors=(-0.35, 0.2), prob=0.15),
        ClipToRanged(image_key),
        RandIntensityInvertd(image_key, prob=0.15),
        # 6. low resolution, p 0.25: nearest down-sampling by U[1, 2], cubic up-sampling
        RandSimulateLowResolutiond(image_key, prob=0.25, downsample_mode="nearest", upsample_mode="bicubic",
                                   zoom_range=(0.5, 1.0)),
        # 7. gamma U[0.7, 1.5] on [0, 1]-scaled intensities, p 0.15; and p 0.15 on the inverted image
        RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5)),
        RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5), invert_image=True),
        # 8. spatial flips, p 0.5 along each axis
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
    ])


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def augment(image: np.ndarray, masks: np.ndarray, seed: int, transforms: Optional[Compose] = None):
    """image (C, S, S) z-scored, masks (K, S, S) 0/1 -> the same, augmented together (seeded)."""
    transforms = transforms or augment_transforms()
    transforms.set_random_state(seed=seed)
    img = torch.as_tensor(image, dtype=torch.float32)
    d = transforms({"image": img, "mask": torch.as_tensor(masks, dtype=torch.float32),
                    "range": (float(img.min()), float(img.max()))})
    out_img = torch.as_tensor(d["image"]).float().numpy()
    out_mask = (torch.as_tensor(d["mask"]).numpy() > 0.5).astype(np.uint8)
    return out_img, out_mask


def to_unit(image: np.ndarray) -> np.ndarray:
    """A z-scored (C, S, S) image -> [0, 1] by its own min and max (MedSAM's per-image min-max), 3 channels."""
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / max(hi - lo, 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Feature cache


def _safe(key: str) -> str:
    return key.replace("/", "__")


class FeatureCache:
    """Encoder features per (image key, view): `<root>/v<view>/<key>.pt` holding {"features": {name: fp16
    (1, C, h, w)}, "image": uint8 (3, S, S) encoder input, "masks": {sample index: packed (S, S/8)}}."""

    def __init__(self, root: str, store: SampleStore, views: int = 2, seed: int = 0):
        self.root, self.store, self.views, self.seed = root, store, views, seed
        self._memo: Dict[tuple, dict] = {}
        self.memo_limit = 0  # entries kept in memory (0: none)

    def path(self, key: str, view: int) -> str:
        return os.path.join(self.root, f"v{view}", _safe(key) + ".pt")

    def views_of(self, key: str) -> List[int]:
        """Augmented views only for images some training task uses (held-out queries are evaluated clean)."""
        roles = {self.store.role(self.store.samples[i].task) for i in self.store.by_image[key]}
        return list(range(self.views)) if "train" in roles else [0]

    def jobs(self) -> List[tuple]:
        """(image key, view), view by view: clean views first (evaluation needs them), then each augmented round."""
        return sorted(((k, v) for k in self.store.by_image for v in self.views_of(k)), key=lambda kv: kv[1])

    def build(self, model: OnePromptModel, log_every: int = 20, time_budget: Optional[float] = None) -> dict:
        jobs = self.jobs()
        todo = [(k, v) for k, v in jobs if not os.path.exists(self.path(k, v))]
        print(f"feature cache {self.root}: {len(jobs)} (image, view) entries, {len(jobs) - len(todo)} cached, "
              f"{len(todo)} to encode", flush=True)
        transforms = augment_transforms()
        start = time.perf_counter()
        done = 0
        for key, view in todo:
            if time_budget is not None and time.perf_counter() - start > time_budget:
                print(f"feature cache: time budget reached after {done} entries", flush=True)
                break
            indices = self.store.by_image[key]
            image = self.store.images[key]
            masks = np.stack([self.store.samples[i].mask(self.store.size) for i in indices])
            if view:
                image, masks = augment(image, masks, _seed_of(self.seed, key, view), transforms)
            unit = to_unit(image)
            feats = model.encode(torch.from_numpy(unit)[None])
            entry = {"features": {n: feats[n].half().contiguous() for n in FEATURE_NAMES},
                     "image": torch.from_numpy((unit * 255).round().astype(np.uint8)),
                     "masks": {int(i): np.packbits(m, axis=-1) for i, m in zip(indices, masks)}}
            path = self.path(key, view)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(entry, path + ".tmp")
            os.replace(path + ".tmp", path)
            done += 1
            if done % log_every == 0 or done == len(todo):
                el = time.perf_counter() - start
                print(f"  encoded {done}/{len(todo)} in {el:.0f}s ({el / done:.2f} s each, "
                      f"eta {el / done * (len(todo) - done):.0f}s)", flush=True)
        total = sum(os.path.getsize(self.path(k, v)) for k, v in jobs if os.path.exists(self.path(k, v)))
        missing = sum(not os.path.exists(self.path(k, v)) for k, v in jobs)
        return {"entries": len(jobs), "encoded_now": done, "missing": missing, "seconds": time.perf_counter() - start,
                "bytes": total}

    def available_views(self, key: str) -> List[int]:
        return [v for v in self.views_of(key) if os.path.exists(self.path(key, v))]

    def load(self, key: str, view: int) -> dict:
        memo = self._memo.get((key, view))
        if memo is not None:
            return memo
        entry = torch.load(self.path(key, view), weights_only=False)
        if self.memo_limit and len(self._memo) < self.memo_limit:
            self._memo[(key, view)] = entry
        return entry

    def item(self, sample, view: int):
        """(features {name: (1, C, h, w) fp16}, unit image (3, S, S) float, mask (S, S) uint8) of a StoredSample, or
        of an AbsentQuery (mask all zero)."""
        entry = self.load(sample.image_key, view)
        if isinstance(sample, AbsentQuery):
            mask = np.zeros((self.store.size, self.store.size), np.uint8)
        else:
            mask = np.unpackbits(entry["masks"][sample.index], axis=-1, count=self.store.size)
        return entry["features"], entry["image"].float() / 255.0, mask


# ---------------------------------------------------------------------------------------------------------------------
# Prompt simulation (supplement 3.1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Sampling (supplement 4: task, then modality, then sample)


class TaskSampler:
    """Draws (query, template, prompt kind) for training: a task uniformly among the training tasks, a modality
    among the task's, a query from the task's train split, a template from the same task's template split."""

    def __init__(self, store: SampleStore, kinds: Sequence[str] = PROMPT_KINDS, seed: int = 0,
                 tasks: Optional[Iterable[str]] = None,
                 absent: Optional[Dict[str, List[AbsentQuery]]] = None, absent_fraction: float = 0.0):
        """absent (SampleStore.absent_queries) and absent_fraction: the share of queries drawn, for tasks that have
        them, from slices where the structure is absent (empty target). Not in the paper, whose queries all hold
        their structure: without them the decoder never learns "absent" and a volume segmented slice by slice
        gets the structure on nearly every slice."""
        if not 0.0 <= absent_fraction < 1.0:
            raise ValueError(f"absent_fraction must be in [0, 1), got {absent_fraction}")
        self.rng = np.random.default_rng(seed)
        self.kinds = list(kinds)
        self.absent = {t: list(q) for t, q in (absent or {}).items() if q}
        self.absent_fraction = float(absent_fraction)
        self.pools: Dict[str, Dict[str, List[StoredSample]]] = {}
        self.templates: Dict[str, List[StoredSample]] = {}
        allowed = set(store.task_ids("train")) if tasks is None else set(tasks)
        for task in sorted(allowed):
            if store.role(task) != "train":
                continue  # held-out tasks never reach training
            queries = store.select(task, "train")
            templates = store.select(task, "template")
            if not queries or not templates:
                continue
            by_mod: Dict[str, List[StoredSample]] = {}
            for s in queries:
                by_mod.setdefault(store.modality(s.task), []).append(s)
            self.pools[task] = by_mod
            self.templates[task] = templates
        self.task_list = sorted(self.pools)
        if not self.task_list:
            raise ValueError("no training task has both train and template samples")

    def draw(self):
        task = self.task_list[self.rng.integers(len(self.task_list))]
        mods = sorted(self.pools[task])
        pool = self.pools[task][mods[self.rng.integers(len(mods))]]
        query = pool[self.rng.integers(len(pool))]
        if self.absent_fraction and task in self.absent and self.rng.random() < self.absent_fraction:
            negatives = self.absent[task]
            query = negatives[self.rng.integers(len(negatives))]
        templates = self.templates[task]
        template = templates[self.rng.integers(len(templates))]
        kind = self.kinds[self.rng.integers(len(self.kinds))]
        return query, template, kind

    def draw_batch(self, n: int):
        """n draws sharing the first draw's prompt kind: one batched forward pass per step."""
        pairs = [self.draw() for _ in range(n)]
        return [(q, t, pairs[0][2]) for q, t, _ in pairs]


# ---------------------------------------------------------------------------------------------------------------------
# Schedule, loss, checkpoints


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps to 1, then cosine decay to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def presence_loss(logits: torch.Tensor, target: torch.Tensor, k: int = 100) -> torch.Tensor:
    """BCE of an image-level logit, the mean of the k highest pixel logits, against "the structure is on this
    query" (k = the data's smallest mask, 100 px at 256). Why: on an empty target the Dice term is saturated
    (1 - 1/(sum p + 1) has almost no gradient until sum p < 1) and the pixel-mean CE of a few hundred false pixels is
    ~0.01, so absent queries alone did not stop the decoder from drawing the template's structure on every slice
    (putamen: 173 of 181 slices with or without them). This term makes a false blob cost as much as a missed one."""
    k = min(k, logits[0].numel())
    image_logit = torch.topk(logits.flatten(1), k, dim=1).values.mean(1)
    present = (target.flatten(1).amax(1) > 0).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(image_logit, present)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, max_weight: float = 50.0) -> torch.Tensor:
    """Class-weighted binary CE + Dice (the paper's "cross-entropy + dice"). Targets are small (median 0.75% of
    the image): with plain mean CE the decoder settles on all-background within ~25 steps and the Dice term,
    whose gradient vanishes as the probabilities saturate, cannot pull it out. Foreground pixels are weighted by
    sqrt(background / foreground) per sample (about 11 at 0.75%, capped at max_weight)."""
    fg = target.flatten(1).mean(1).clamp(1e-4, 1.0)
    weight = torch.sqrt((1 - fg) / fg).clamp(1.0, max_weight).reshape(-1, *([1] * (target.ndim - 1)))
    ce = F.binary_cross_entropy_with_logits(logits, target, weight=1 + (weight - 1) * target)
    return ce + dice_loss(logits, target)


def trainable_state(model: OnePromptModel, dtype: Optional[torch.dtype] = None) -> dict:
    """Decoder + prompt encoder parameters and buffers: everything but the frozen image encoder. (The SegLab
    autoencoder is held outside the module tree and saved on its own; the prompt encoder's SegLab pooling layers,
    `prompt_encoder.seglab_*`, are trained here and belong in this state.)"""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("image_encoder."):
            continue
        out[k] = v.detach().to(dtype) if (dtype is not None and v.is_floating_point()) else v.detach().clone()
    return out


def atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    time_budget: Optional[float] = None  # seconds; training stops early (the schedule keeps its length)
    stop_at: Optional[int] = None  # step; training stops there (the schedule keeps its length): replays a run
    # that its time budget stopped, step for step
    levels: Sequence[str] = ("high", "medium", "low")
    presence_weight: float = 0.0  # weight of presence_loss (our addition, with absent queries; 0: the paper's loss)
    log_every: int = 20
    checkpoint_every: int = 100
    seed: int = 0


class PairSource:
    """Features, masks and images of sampled pairs, from a FeatureCache (or from in-memory items in tests)."""

    def __init__(self, cache: FeatureCache, rng: np.random.Generator):
        self.cache, self.rng = cache, rng

    def get(self, sample: StoredSample, view: Optional[int] = None):
        views = self.cache.available_views(sample.image_key)
        if view is None:
            view = int(views[self.rng.integers(len(views))])
        return self.cache.item(sample, view)


def _stack_features(items: List[dict]) -> Dict[str, torch.Tensor]:
    return {n: torch.cat([f[n] for f in items]).float() for n in FEATURE_NAMES}


def train_decoder(model: OnePromptModel, sampler: TaskSampler, source, config: TrainConfig,
                  checkpoint: Optional[str] = None, log=print) -> dict:
    """Train the decoder and prompt encoder on sampled pairs. `source.get(sample)` -> (features, unit image,
    mask). Resumes from `checkpoint` when it exists; saves it atomically every `checkpoint_every` steps and at
    the end. Returns the history {"losses": [...], "steps_done", "seconds", ...}."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    rng = np.random.default_rng(config.seed + 1)
    history = {"losses": [], "lrs": [], "step": 0, "seconds": 0.0}
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        sampler.rng = state["sampler_rng"]
        rng = state["rng"]
        log(f"resumed from {checkpoint} at step {history['step']}")
    if hasattr(source, "rng"):
        source.rng = rng

    def save():
        if checkpoint:
            atomic_save({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "history": history, "sampler_rng": sampler.rng,
                         "rng": rng, "config": config.__dict__}, checkpoint)

    model.train()
    start = time.perf_counter()
    seconds_before = history["seconds"]
    window: List[float] = []
    while history["step"] < min(config.steps, config.stop_at or config.steps):
        if config.time_budget is not None and time.perf_counter() - start > config.time_budget:
            log(f"time budget reached at step {history['step']}")
            break
        pairs = sampler.draw_batch(config.batch_size)
        groups: Dict[str, list] = {}
        for q, t, kind in pairs:
            groups.setdefault(kind, []).append((q, t))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for kind, group in groups.items():
            q_items = [source.get(q) for q, _ in group]
            t_items = [source.get(t) for _, t in group]
            level = config.levels[int(rng.integers(len(config.levels)))]
            prompt = make_prompt(kind, [m for _, _, m in t_items], torch.stack([im for _, im, _ in t_items]),
                                 level, rng)
            logits = model(_stack_features([f for f, _, _ in q_items]), _stack_features([f for f, _, _ in t_items]),
                           prompt)
            target = torch.from_numpy(np.stack([m for _, _, m in q_items]).astype(np.float32))[:, None]
            loss = segmentation_loss(logits, target)
            if config.presence_weight:
                loss = loss + config.presence_weight * presence_loss(logits, target)
            loss = loss * (len(group) / len(pairs))
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history["step"] += 1
        history["losses"].append(round(total, 5))
        history["lrs"].append(optimizer.param_groups[0]["lr"])
        history["seconds"] = seconds_before + time.perf_counter() - start
        window.append(total)
        step = history["step"]
        if config.log_every and (step % config.log_every == 0 or step == config.steps):
            log(f"step {step}/{config.steps} loss {np.mean(window):.4f} lr {history['lrs'][-1]:.2e} "
                f"{history['seconds']:.0f}s ({step / max(history['seconds'], 1e-9):.2f} steps/s overall)")
            window = []
        if checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
            save()
    save()
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = pred.astype(bool), target.astype(bool)
    denom = pred.sum() + target.sum()
    return 1.0 if denom == 0 else float(2 * (pred & target).sum() / denom)


def prototype_similarity(query_neck: torch.Tensor, template_neck: torch.Tensor, template_mask: np.ndarray,
                         size: int = 256) -> torch.Tensor:
    """PerSAM's training-free location prior without its refinement: the masked average of the template's neck
    features (mask area-pooled to the feature grid) against every query feature by cosine similarity, upsampled
    to (B, S, S)."""
    proto = masked_prototype(template_neck.float()[:1], torch.from_numpy(template_mask.astype(np.float32))[None, None])
    q = F.normalize(query_neck.float(), dim=1)
    sim = torch.einsum("bchw,c->bhw", q, F.normalize(proto[0], dim=0))
    return F.interpolate(sim[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def calibrate_prototype_threshold(store: SampleStore, cache: FeatureCache, max_tasks: int = 40, seed: int = 0,
                                  grid: Sequence[float] = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2))) -> float:
    """The similarity threshold with the best mean Dice on TRAINING tasks (clean views), never held-out ones."""
    rng = np.random.default_rng(seed)
    tasks = store.task_ids("train")
    tasks = [tasks[i] for i in rng.permutation(len(tasks))[:max_tasks]]
    scores = {g: [] for g in grid}
    for task in tasks:
        templates, queries = store.select(task, "template"), store.select(task, "train")
        if not templates or not queries:
            continue
        tf, _, tm = cache.item(templates[0], 0)
        for q in queries[:4]:
            qf, _, qm = cache.item(q, 0)
            sim = prototype_similarity(qf["neck"], tf["neck"], tm)[0].numpy()
            for g in grid:
                scores[g].append(dice_score(sim > g, qm))
    return float(max(grid, key=lambda g: np.mean(scores[g]) if scores[g] else -1))


def litemedsam_prediction(sam, query_neck: torch.Tensor, kind: str, template_mask: np.ndarray) -> np.ndarray:
    """Frozen LiteMedSAM on the query (its cached image embedding = the encoder's neck) given the template's
    ORACLE prompt copied onto the query: box -> the template's box; click -> the template's click as a positive
    point; doodle -> the box around the template's positive doodle points; SegLab -> the template mask's box."""
    with torch.no_grad():
        if kind == "click":
            pt = torch.from_numpy(oracle_click(template_mask))[None, None]
            logits, _ = sam.decode(query_neck.float(), point_coords=pt, point_labels=torch.ones(1, 1))
        else:
            if kind == "doodle":
                pos, _ = simulate_doodle(template_mask, 0.0, np.random.default_rng(0))
                box = np.concatenate([pos.min(0), pos.max(0)])
            else:
                box = oracle_box(template_mask)
            logits, _ = sam.decode(query_neck.float(), boxes=torch.from_numpy(box.astype(np.float32))[None])
    if logits.shape[-1] != template_mask.shape[-1]:
        logits = F.interpolate(logits, size=template_mask.shape, mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


def evaluate(model: OnePromptModel, store: SampleStore, cache: FeatureCache, sam=None,
             kinds: Sequence[str] = PROMPT_KINDS, role: str = "heldout", query_split: str = "test",
             prototype_threshold: Optional[float] = None, max_queries: Optional[int] = None,
             tasks: Optional[Sequence[str]] = None, max_templates: Optional[int] = None, log=print) -> dict:
    """Per task of `role` (held-out by default) and prompt kind: mean Dice over the queries of `query_split`,
    each given every template of the task's template split (oracle prompts, clean views). Baselines computed in
    the same pass: "litemedsam" (frozen LiteMedSAM, the template's prompt copied onto the query; needs `sam`) and
    "prototype" (masked-average template neck features, cosine similarity, `prototype_threshold`)."""
    model.eval()
    rng = np.random.default_rng(0)
    task_ids = list(tasks) if tasks is not None else store.task_ids(role)
    per_task: Dict[str, dict] = {}
    for task in task_ids:
        templates = store.select(task, "template")[:max_templates]
        queries = store.select(task, query_split)[:max_queries]
        if not templates or not queries:
            continue
        q_items = [cache.item(q, 0) for q in queries]
        q_feats = _stack_features([f for f, _, _ in q_items])
        q_masks = [m for _, _, m in q_items]
        res = {k: [] for k in kinds}
        res.update({f"litemedsam_{k}": [] for k in kinds} if sam is not None else {})
        res["prototype"] = []
        for t in templates:
            tf, timg, tm = cache.item(t, 0)
            t_feats = _stack_features([tf])
            for kind in kinds:
                prompt = make_prompt(kind, [tm], timg[None], "oracle", rng)
                with torch.no_grad():
                    logits = model(q_feats, t_feats, prompt)
                for b, qm in enumerate(q_masks):
                    res[kind].append(dice_score((logits[b, 0] > 0).numpy(), qm))
                if sam is not None and kind == "seglab" and "bbox" in kinds:
                    # the same oracle box as "bbox": LiteMedSAM cannot take a mask prompt from another image
                    res["litemedsam_seglab"] = res["litemedsam_bbox"]
                elif sam is not None:
                    for b, qm in enumerate(q_masks):
                        pred = litemedsam_prediction(sam, q_feats["neck"][b:b + 1], kind, tm)
                        res[f"litemedsam_{kind}"].append(dice_score(pred, qm))
            if prototype_threshold is not None:
                sim = prototype_similarity(q_feats["neck"], tf["neck"], tm)
                for b, qm in enumerate(q_masks):
                    res["prototype"].append(dice_score((sim[b] > prototype_threshold).numpy(), qm))
        per_task[task] = {k: float(np.mean(v)) for k, v in res.items() if v}
        per_task[task]["n_queries"] = len(queries)
        log(f"  {task}: " + " ".join(f"{k}={v:.3f}" for k, v in per_task[task].items() if k != "n_queries"))
    columns = sorted({k for r in per_task.values() for k in r if k != "n_queries"})
    mean = {c: float(np.mean([r[c] for r in per_task.values() if c in r])) for c in columns}
    return {"per_task": per_task, "mean": mean, "tasks": len(per_task),
            "prototype_threshold": prototype_threshold}


def markdown_table(result: dict, kinds: Sequence[str] = PROMPT_KINDS) -> str:
    mean = result["mean"]
    proto = mean.get("prototype")
    lines = ["| prompt | One-Prompt (ours) | LiteMedSAM, template prompt copied | prototype (training-free) |",
             "|---|---|---|---|"]
    for k in kinds:
        ours = mean.get(k)
        sam = mean.get(f"litemedsam_{k}")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {k} | {fmt(ours)} | {fmt(sam)} | {fmt(proto)} |")
    lines.append(f"\nmean Dice over {result['tasks']} tasks (each task weighted equally; queries x templates "
                 f"averaged within a task); prototype threshold {result.get('prototype_threshold')} "
                 f"(calibrated on training tasks; it uses the template mask, whatever the prompt kind)")
    return "\n".join(lines)


def train_seglab_on_store(store: SampleStore, cache: FeatureCache, steps: int = 300, seed: int = 0,
                          max_masks: int = 600, log_every: int = 50) -> SegLabAutoencoder:
    """The SegLab autoencoder on training-task masks (train + template splits, clean view) with their images."""
    samples = [s for s in store.samples if store.role(s.task) == "train"]
    rng = np.random.default_rng(seed)
    samples = [samples[i] for i in rng.permutation(len(samples))[:max_masks]]
    masks, images = [], []
    for s in samples:
        _, img, m = cache.item(s, 0)
        masks.append(torch.from_numpy(m.astype(np.float32)))
        images.append(img)
    return train_seglab(torch.stack(masks)[:, None], torch.stack(images), steps=steps, seed=seed,
                        straight_through=True, log_every=log_every)
