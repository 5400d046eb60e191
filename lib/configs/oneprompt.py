"""One-Prompt (Wu et al., CVPR 2024) served as model `oneprompt`: templates registered once, then segmentation of
new slices and images from them (modes in lib/oneprompt/infer.py).

The weights (`oneprompt_weights`, default lib/oneprompt/weights/oneprompt_litemedsam.pt, as written by
scripts/train_oneprompt.py) are read on the first request, so the app starts as fast without them and a missing
file is a 503 on use, not a failed start. The decoder was trained on the frozen default LiteMedSAM TinyViT, so
when the app serves that encoder (no `litemedsam_checkpoint`) One-Prompt shares it, and its image cache, with the
`litemedsam` model; with another LiteMedSAM checkpoint it builds its own copy of the default one. Templates are
kept under <models>/oneprompt/templates/.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.backbones import ServedModels
from lib.core.settings import REPO_ROOT, load_settings, resolve_path
from lib.oneprompt.checkpoint import DEFAULT_WEIGHTS, load_oneprompt
from lib.core.backbone import mebibytes
from lib.oneprompt.infer import OnePromptInfer
from lib.oneprompt.templates import TemplateStore


class OnePromptConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, served: ServedModels = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        served = served or ServedModels(self.model_dir, self.settings)
        self.shared = served.default_litemedsam()
        self.runtime_cache_dir = served.runtime_cache_dir
        self.weights = resolve_path(self.settings.get("oneprompt_weights") or DEFAULT_WEIGHTS, REPO_ROOT)
        self.store = TemplateStore(os.path.join(self.model_dir, "oneprompt", "templates"))

    def build_model(self, device: torch.device):
        encoder = self.shared.model.image_encoder if self.shared else None
        return load_oneprompt(self.weights, device, encoder)

    def infer(self) -> Dict[str, InferTask]:
        return {"oneprompt": OnePromptInfer(
            self.build_model, self.store, device=self.settings["device"],
            image_loader=self.shared.image if self.shared else None,
            feature_cache_size=int(self.settings.get("oneprompt_feature_cache_size") or 32),
            feature_cache_bytes=mebibytes(self.settings.get("oneprompt_feature_cache_mb")),
            default_modality=self.settings["modality"], default_ct_window=self.settings["ct_window"],
            encoder_runtime=self.settings.get("encoder_runtime", "auto"), runtime_cache_dir=self.runtime_cache_dir,
            backbone=self.shared,
            description="One-Prompt: register a prompted slice as a template (mode register), then segment "
                        "volumes and images with it (segment), or prompt a slice (interactive, everything)")}

    def trainer(self) -> Optional[TrainTask]:
        return None  # trained offline: scripts/train_oneprompt.py
