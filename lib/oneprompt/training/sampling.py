"""What training draws (the One-Prompt supplement, section 4: task, then modality, then sample): a query and a
template of the same training task and a prompt kind per pair, and the cached features of each drawn sample."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from lib.oneprompt.model.prompt_encoder import PROMPT_KINDS
from lib.oneprompt.training.features import FeatureCache
from lib.oneprompt.training.samples import AbsentQuery, SampleStore, StoredSample


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


class PairSource:
    """Features, masks and images of sampled pairs, from a FeatureCache (or from in-memory items in tests)."""

    def __init__(self, cache: FeatureCache, rng: np.random.Generator):
        self.cache, self.rng = cache, rng

    def get(self, sample: StoredSample, view: Optional[int] = None):
        views = self.cache.available_views(sample.image_key)
        if view is None:
            view = int(views[self.rng.integers(len(views))])
        return self.cache.item(sample, view)
