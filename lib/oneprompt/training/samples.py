"""The built training data read back (data/oneprompt/: shards + manifest.json, written by lib.oneprompt.dataset):
every sample, with its task's role and modality, images kept once per image key and masks bit-packed, so that the
whole multi-task set fits in memory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from lib.oneprompt.dataset import load_shard


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
