"""MSA adapters on a base model's frozen backbone: `<base>_msa` infer and train tasks (paper 002).

The base config (LiteMedSAM, or Meta SAM when configured) is given at init; the adapter tasks share its model in
memory and its image and embedding caches, and keep one adapter file per label under <models>/adapters/<name>/.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.msa_adapter import AdapterInfer
from ..trainers.label_store import LabelStore
from ..trainers.msa_task import MSATrainTask
from .settings import load_settings


class MSAConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, base: TaskConfig | None = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        if base is None:
            raise ValueError("MSAConfig needs the base model's config (base=...)")
        self.base = base
        self.settings = load_settings(conf)
        self.store = LabelStore(os.path.join(self.model_dir, "adapters", self.name))

    def infer(self) -> Dict[str, InferTask]:
        return {self.name: AdapterInfer(self.base.interactive_task(), self.store,
                                        f"MSA adapters on {self.base.name}: clicks or a box, answered by the "
                                        f"label's trained adapter (the frozen model when it has none)")}

    def trainer(self) -> Optional[TrainTask]:
        return MSATrainTask.from_settings(os.path.join(self.model_dir, "train", self.name), self.base.build_model,
                                          self.store, self.settings)
