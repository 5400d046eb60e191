"""MSA adapters on each served model's frozen backbone: `<model>_msa` infer and train tasks (Wu et al., Medical
Image Analysis 2025). One adapter file per label under <models>/adapters/<model>_msa/; the adapted models share
the backbone's tensors, caches and device."""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.backbones import ServedModels
from lib.core.settings import load_settings
from lib.core.stores import LabelStore
from lib.msa.infer import AdapterInfer
from lib.msa.train_task import MSATrainTask


class MSAConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, served: ServedModels = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        self.served = served or ServedModels(self.model_dir, self.settings)
        self.stores = {base: LabelStore(os.path.join(self.model_dir, "adapters", f"{base}_msa"))
                       for base in self.served.names}

    def infer(self) -> Dict[str, InferTask]:
        return {f"{base}_msa": AdapterInfer(
            self.served.backbone(base), self.served.interactive(base), self.stores[base],
            f"MSA adapters on {base}: clicks or a box, answered by the label's trained adapter (the frozen model "
            f"when it has none)") for base in self.served.names}

    def trainer(self) -> Optional[Dict[str, TrainTask]]:
        return {f"{base}_msa": MSATrainTask.from_settings(os.path.join(self.model_dir, "train", f"{base}_msa"),
                                                          self.served.backbone(base).model_factory,
                                                          self.stores[base], self.settings)
                for base in self.served.names}
