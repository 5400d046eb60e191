"""One-Prompt templates on disk: a prompted slice, kept so that later requests segment new images from it.

Layout: <root>/<label>/<n>.pt (the slice's 3 x 256 x 256 encoder input as uint8, its encoder features in fp16 and
the prompt in 256 x 256 model pixels) and <root>/<label>/<n>.json (what it is: label, id "<label>/<n>", prompt kind,
source image, axis, slice, modality, creation time), the JSON written last and both atomically (as LabelStore
does), so a template is either complete or absent. A label may hold several templates: segmenting with the label
averages their predictions (the paper's template ensembling).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from lib.core.errors import bad_request, not_found
from lib.core.stores import atomic_write, safe_name

TEMPLATE_ID = re.compile(r"^(?P<label>.+)/(?P<n>\d+)$")


@dataclass
class Template:
    id: str
    meta: dict
    image: torch.Tensor  # (3, S, S) float in [0, 1]
    features: dict  # name -> (1, C, h, w) fp16
    prompt: dict  # kind, points (K, 2) x y, labels (K,), box (4,), mask (S, S) uint8

    @property
    def label(self) -> str:
        return self.meta["label"]


class TemplateStore:
    def __init__(self, root: str):
        self.root = root
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, Template]] = {}

    def _dir(self, label: str) -> str:
        try:
            return os.path.join(self.root, safe_name(label))
        except ValueError as e:
            raise bad_request(f"label {label!r} cannot name a template: {e}") from e

    def add(self, label: str, image: torch.Tensor, features: dict, prompt: dict, meta: dict) -> str:
        """Store a new template of `label`; returns its id "<label>/<n>"."""
        folder = self._dir(label)
        with self._lock:
            os.makedirs(folder, exist_ok=True)
            taken = [int(name[:-5]) for name in os.listdir(folder) if name.endswith(".json") and name[:-5].isdigit()]
            n = max(taken, default=0) + 1
            template_id = f"{label}/{n}"
            tensors = {"image": (image.clamp(0, 1) * 255).round().to(torch.uint8),
                       "features": {k: v.detach().half().contiguous().cpu() for k, v in features.items()},
                       "prompt": {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in prompt.items()}}
            atomic_write(os.path.join(folder, f"{n}.pt"), lambda f: torch.save(tensors, f))
            info = {"label": label, "id": template_id, **meta}
            atomic_write(os.path.join(folder, f"{n}.json"), lambda f: f.write(json.dumps(info, indent=2).encode()))
        return template_id

    def metas(self, label: str) -> list[dict]:
        """Every complete template of a label, oldest first."""
        folder = self._dir(label)
        return self.metas_in(os.path.basename(folder)) if os.path.isdir(folder) else []

    def labels(self) -> dict[str, list[dict]]:
        if not os.path.isdir(self.root):
            return {}
        out = {}
        for folder in sorted(os.listdir(self.root)):
            if os.path.isdir(os.path.join(self.root, folder)):
                for meta in self.metas_in(folder):
                    out.setdefault(meta["label"], []).append(meta)
        return out

    def metas_in(self, folder: str) -> list[dict]:
        path = os.path.join(self.root, folder)
        names = sorted((n for n in os.listdir(path) if n.endswith(".json") and n[:-5].isdigit()),
                       key=lambda n: int(n[:-5]))
        out = []
        for name in names:
            try:
                with open(os.path.join(path, name)) as f:
                    out.append(json.load(f))
            except (FileNotFoundError, ValueError):
                continue
        return out

    def info(self) -> dict:
        """label -> summary for /info: how many templates, which prompt kinds, where they came from."""
        return {label: {"templates": len(metas), "ids": [m["id"] for m in metas],
                        "prompt_kinds": sorted({m.get("prompt_kind") for m in metas}),
                        "sources": [{k: m.get(k) for k in ("id", "image", "axis", "slice", "prompt_kind", "modality",
                                                            "created")} for m in metas]}
                for label, metas in self.labels().items()}

    def resolve(self, names) -> list[str]:
        """Template ids for a label name or template id (or a list of them); 404 for anything unknown."""
        names = list(names) if isinstance(names, (list, tuple)) else [names]
        ids = []
        for name in names:
            if not isinstance(name, str) or not name:
                raise bad_request(f"a template is named by its label or its id '<label>/<n>', got {name!r}")
            match = TEMPLATE_ID.match(name)
            if match and os.path.exists(self._paths(match["label"], int(match["n"]))[1]):
                ids.append(name)
                continue
            metas = self.metas(name)
            if not metas:
                known = sorted(m["id"] for ms in self.labels().values() for m in ms)
                raise not_found(f"unknown template {name!r}: register one with mode 'register' (known: {known})")
            ids += [m["id"] for m in metas]
        return list(dict.fromkeys(ids))

    def _paths(self, label: str, n: int) -> tuple[str, str]:
        folder = self._dir(label)
        return os.path.join(folder, f"{n}.pt"), os.path.join(folder, f"{n}.json")

    def load(self, template_id: str) -> Template:
        match = TEMPLATE_ID.match(template_id)
        if not match:
            raise not_found(f"unknown template {template_id!r}")
        weights, meta_path = self._paths(match["label"], int(match["n"]))
        try:
            stamp = os.stat(weights).st_mtime_ns
            with open(meta_path) as f:
                meta = json.load(f)
        except (FileNotFoundError, ValueError) as e:
            raise not_found(f"unknown template {template_id!r}") from e
        with self._lock:
            cached = self._loaded.get(template_id)
            if cached and cached[0] == stamp:
                return cached[1]
        data = torch.load(weights, map_location="cpu", weights_only=True)
        template = Template(template_id, meta, data["image"].float() / 255.0, data["features"],
                            {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data["prompt"].items()})
        with self._lock:
            self._loaded[template_id] = (stamp, template)
        return template
