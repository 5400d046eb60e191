"""The frozen encoder's features of every training image, cached on disk: the encoder runs once per image and
view, not per training step, which is what makes training on a CPU possible.

Each (image key, view) is one fp16 `.pt` file under `<root>/v<view>/`; view 0 is the clean image, views >= 1 are
augmented (seeded per image and view). Samples cut from the same slice share one file, which also keeps that view's
(transformed) masks of every sample on the image. Building is resumable (existing files are skipped). Because views
are cached, training draws the query's view and the template's view independently: the supplement's "each
augmentation is individually applied to the template sample and the query sample", with a finite number of draws.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from lib.core.stores import atomic_write, safe_name
from lib.oneprompt.model import OnePromptModel
from lib.oneprompt.preprocessing import to_unit
from lib.oneprompt.training.augmentation import augment, augment_transforms, seed_of
from lib.oneprompt.training.samples import AbsentQuery, SampleStore

FEATURE_NAMES = ("stage1", "stage2", "neck")


def stack_features(items: List[dict]) -> Dict[str, torch.Tensor]:
    """Features of several cache items {name: (1, C, h, w)} as one float batch {name: (B, C, h, w)}."""
    return {n: torch.cat([f[n] for f in items]).float() for n in FEATURE_NAMES}


class FeatureCache:
    """Encoder features per (image key, view): `<root>/v<view>/<key>.pt` holding {"features": {name: fp16
    (1, C, h, w)}, "image": uint8 (3, S, S) encoder input, "masks": {sample index: packed (S, S/8)}}."""

    def __init__(self, root: str, store: SampleStore, views: int = 2, seed: int = 0):
        self.root, self.store, self.views, self.seed = root, store, views, seed
        self._memo: Dict[tuple, dict] = {}
        self.memo_limit = 0  # entries kept in memory (0: none)

    def path(self, key: str, view: int) -> str:
        return os.path.join(self.root, f"v{view}", safe_name(key.replace("/", "__")) + ".pt")

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
                image, masks = augment(image, masks, seed_of(self.seed, key, view), transforms)
            unit = to_unit(image)
            feats = model.encode(torch.from_numpy(unit)[None])
            entry = {"features": {n: feats[n].half().contiguous() for n in FEATURE_NAMES},
                     "image": torch.from_numpy((unit * 255).round().astype(np.uint8)),
                     "masks": {int(i): np.packbits(m, axis=-1) for i, m in zip(indices, masks)}}
            path = self.path(key, view)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: torch.save(entry, f))
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
