"""Meta's SAM ViT-B/L/H (1024x1024 input), served when the user gives a checkpoint path or URL."""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.sam_auto import SamAutoInfer
from ..infers.sam_interactive import SamInteractiveInfer
from ..trainers.label_store import LabelStore
from ..trainers.samassist_task import SAMassistTrainTask
from .settings import load_settings


class MetaSAMConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        self.prompt_store = LabelStore(os.path.join(self.model_dir, "prompts", self.name))

    def build_model(self, device):
        from ..models.sam import build_sam_vit, resolve_checkpoint

        checkpoint = resolve_checkpoint(self.settings["sam_checkpoint"], cache_dir=self.model_dir)
        return build_sam_vit(self.settings["sam_variant"], checkpoint=checkpoint, device=device)

    def interactive_task(self) -> SamInteractiveInfer:
        """The interactive task, made once: the SAMauto and MSA tasks share its model and caches."""
        if getattr(self, "_interactive", None) is None:
            self._interactive = SamInteractiveInfer.from_settings(
                self.build_model, f"Segment Anything {self.settings['sam_variant'].upper()} (Meta): draw a box or click "
                "on a slice", self.settings, prompt_store=self.prompt_store)
        return self._interactive

    def infer(self) -> Dict[str, InferTask]:
        task = self.interactive_task()
        return {self.name: task, f"{self.name}_auto": SamAutoInfer(task, self.prompt_store)}

    def trainer(self) -> Optional[TrainTask]:
        return SAMassistTrainTask.from_settings(os.path.join(self.model_dir, "train", self.name), self.build_model,
                                                self.prompt_store, self.settings)
