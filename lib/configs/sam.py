"""SAM serving and SAM^Med on each served SAM-family model: the interactive task (`<model>`), SAMauto
(`<model>_auto`) and the SAMassist train task (`POST /train/<model>`). LiteMedSAM is always served; Meta's SAM
ViT-B/L/H when `sam_checkpoint` names a checkpoint."""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.backbones import ServedModels
from lib.core.settings import load_settings
from lib.sammed.active_learning import SAMautoScores, UncertainImage, UncertainSlice, UncertaintyScoring
from lib.sammed.auto_infer import SamAutoInfer
from lib.sammed.train_task import SAMassistTrainTask


class SAMConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, served: ServedModels = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        self.served = served or ServedModels(self.model_dir, self.settings)
        # One SAMauto task per model, shared by its infer endpoint, its strategies and its scoring method.
        self._auto = {name: SamAutoInfer(self.served.backbone(name), self.served.prompt_store(name))
                      for name in self.served.names}

    def infer(self) -> Dict[str, InferTask]:
        tasks = {}
        for name in self.served.names:
            tasks[name] = self.served.interactive(name)
            tasks[f"{name}_auto"] = self._auto[name]
        return tasks

    def trainer(self) -> Optional[Dict[str, TrainTask]]:
        return {name: SAMassistTrainTask.from_settings(os.path.join(self.model_dir, "train", name),
                                                       self.served.backbone(name).model_factory,
                                                       self.served.prompt_store(name), self.settings,
                                                       self.served.runtime_cache_dir)
                for name in self.served.names}

    def strategy(self):
        """Next Sample for each model's learned labels: the image, and the slice in it, where SAMauto is least sure."""
        out = {}
        for name in self.served.names:
            scores = SAMautoScores(self._auto[name], self.served.prompt_store(name))
            out[f"{name}_uncertain_image"], out[f"{name}_uncertain_slice"] = UncertainImage(scores), UncertainSlice(scores)
        return out

    def scoring_method(self):
        return {f"{name}_uncertainty": UncertaintyScoring(SAMautoScores(self._auto[name], self.served.prompt_store(name)))
                for name in self.served.names}
