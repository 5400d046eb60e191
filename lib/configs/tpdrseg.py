"""TP-DRSeg (issue 6, paper 001) served as model `tpdrseg`: type a diabetic-retinopathy lesion (class name, synonym or
free text), get its mask on a fundus photograph; `POST /train/tpdrseg` trains it on the datastore's lesion labels.

Weights: the ones trained here (<models>/tpdrseg/tpdrseg_trained.pt, written by the train task) when present, else
`tpdrseg_weights` (default lib/models/tpdrseg/weights/tpdrseg_litemedsam.pt; relative paths are relative to the
repository; a .pt, or the folder `python -m lib.trainers.tpdrseg --output DIR` writes). Read on the first request,
so the app starts as fast without them and a missing file is a 503 on use. The model was trained on the frozen
default LiteMedSAM, so when the app serves that encoder (no `litemedsam_checkpoint`) TP-DRSeg shares it in memory
with the `litemedsam` model (and its image cache); otherwise it builds its own copy of the default one.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..infers.tpdrseg import TPDRSegInfer, TPDRSegModels
from ..trainers.tpdrseg_task import TPDRSegTrainTask
from .settings import REPO_ROOT, load_settings, resolve_path

DEFAULT_WEIGHTS = os.path.join(REPO_ROOT, "lib", "models", "tpdrseg", "weights", "tpdrseg_litemedsam.pt")


class TPDRSegConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, base: TaskConfig | None = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.base = base  # the LiteMedSAM config: its frozen encoder and image cache are shared
        self.settings = load_settings(conf)
        configured = resolve_path(self.settings.get("tpdrseg_weights") or DEFAULT_WEIGHTS, REPO_ROOT)
        lesions = self.settings.get("tpdrseg_lesions") or None
        self.models = TPDRSegModels(
            configured, os.path.join(self.model_dir, "tpdrseg", "tpdrseg_trained.pt"), self.build_sam,
            device=self.settings["device"], lesions_file=resolve_path(lesions, REPO_ROOT) if lesions else None,
            clip_weights=resolve_path(self.settings.get("tpdrseg_clip_weights") or "", REPO_ROOT) or None)

    def build_sam(self, device: torch.device):
        if self.base is not None and not self.settings.get("litemedsam_checkpoint"):
            return self.base.interactive_task().model  # the default LiteMedSAM, already served
        from ..models.sam import build_litemedsam

        return build_litemedsam(device=device)

    def infer(self) -> Dict[str, InferTask]:
        image_loader = self.base.interactive_task().image if self.base is not None else None
        try:
            threshold = float(self.settings.get("tpdrseg_threshold", 0.5))
        except (TypeError, ValueError):
            threshold = 0.5
        return {self.name: TPDRSegInfer(
            self.models, image_loader=image_loader, threshold=threshold,
            text_encoder="clip" if self.models.clip_weights else "minilm",
            description="TP-DRSeg: type a diabetic-retinopathy lesion (microaneurysms, haemorrhages, hard or soft "
                        "exudates, a synonym, or free text; 'all' for every class) and get its mask on a fundus "
                        "photograph")}

    def trainer(self) -> Optional[TrainTask]:
        return TPDRSegTrainTask(os.path.join(self.model_dir, "train", self.name), self.models,
                                device=self.settings["device"])
