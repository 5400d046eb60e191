"""TP-DRSeg (Li et al., MICCAI 2024) served as model `tpdrseg`: type a diabetic-retinopathy lesion (class name, synonym or
free text), get its mask on a fundus photograph; `POST /train/tpdrseg` trains it on the datastore's lesion labels.

Weights: the ones trained here (<models>/tpdrseg/tpdrseg_trained.pt, written by the train task) when present, else
`tpdrseg_weights` (default lib/tpdrseg/weights/tpdrseg_litemedsam.pt; relative paths are relative to the
repository; a .pt, or the folder `python -m lib.tpdrseg.training --output DIR` writes). Read on the first request,
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

from lib.tpdrseg.infer import TPDRSegInfer, TPDRSegModels
from lib.tpdrseg.train_task import TPDRSegTrainTask
from lib.configs.backbones import ServedModels
from lib.core.settings import REPO_ROOT, load_settings, resolve_path

DEFAULT_WEIGHTS = os.path.join(REPO_ROOT, "lib", "tpdrseg", "weights", "tpdrseg_litemedsam.pt")


class TPDRSegConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, served: ServedModels = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        # The default LiteMedSAM's frozen encoder and image cache are shared; None when another checkpoint is served.
        self.shared = (served or ServedModels(self.model_dir, self.settings)).default_litemedsam()
        configured = resolve_path(self.settings.get("tpdrseg_weights") or DEFAULT_WEIGHTS, REPO_ROOT)
        lesions = self.settings.get("tpdrseg_lesions") or None
        self.models = TPDRSegModels(
            configured, os.path.join(self.model_dir, "tpdrseg", "tpdrseg_trained.pt"), self.build_sam,
            device=self.settings["device"], lesions_file=resolve_path(lesions, REPO_ROOT) if lesions else None,
            clip_weights=resolve_path(self.settings.get("tpdrseg_clip_weights") or "", REPO_ROOT) or None)

    def build_sam(self, device: torch.device):
        if self.shared is not None:
            return self.shared.model  # the default LiteMedSAM, already served
        from lib.models.sam import build_litemedsam

        return build_litemedsam(device=device)

    def infer(self) -> Dict[str, InferTask]:
        image_loader = self.shared.image if self.shared is not None else None
        try:
            threshold = float(self.settings.get("tpdrseg_threshold", 0.5))
        except (TypeError, ValueError):
            threshold = 0.5
        return {"tpdrseg": TPDRSegInfer(
            self.models, image_loader=image_loader, threshold=threshold,
            text_encoder="clip" if self.models.clip_weights else "minilm",
            description="TP-DRSeg: type a diabetic-retinopathy lesion (microaneurysms, haemorrhages, hard or soft "
                        "exudates, a synonym, or free text; 'all' for every class) and get its mask on a fundus "
                        "photograph")}

    def trainer(self) -> Optional[TrainTask]:
        return {"tpdrseg": TPDRSegTrainTask(os.path.join(self.model_dir, "train", "tpdrseg"), self.models,
                                device=self.settings["device"])}
