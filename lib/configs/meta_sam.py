"""Meta's SAM ViT-B/L/H (1024x1024 input), served when the user gives a checkpoint path or URL."""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.sam_interactive import SamInteractiveInfer
from .settings import load_settings


class MetaSAMConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)

    def infer(self) -> Dict[str, InferTask]:
        from ..models.sam import build_sam_vit, resolve_checkpoint

        variant, source = self.settings["sam_variant"], self.settings["sam_checkpoint"]
        task = SamInteractiveInfer.from_settings(
            lambda device: build_sam_vit(variant, checkpoint=resolve_checkpoint(source, cache_dir=self.model_dir),
                                         device=device),
            f"Segment Anything {variant.upper()} (Meta): draw a box or click on a slice", self.settings)
        return {self.name: task}

    def trainer(self) -> Optional[TrainTask]:
        return None
