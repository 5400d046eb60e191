"""TP-DRSeg (Li et al., MICCAI 2024) served as model `tpdrseg`: type a diabetic-retinopathy lesion (class name, synonym
or free text), get its mask on a fundus photograph; `POST /train/tpdrseg` trains it on the datastore's lesion labels.

Weights: the ones trained here (<models>/tpdrseg/tpdrseg_trained.pt, written by the train task) when present, else
`tpdrseg_weights` (default lib/tpdrseg/weights/tpdrseg_litemedsam.pt; lib/tpdrseg/served_models.py). The model was
trained on the frozen default LiteMedSAM, so when the app serves that encoder (no `litemedsam_checkpoint`) TP-DRSeg
shares it in memory with the `litemedsam` model (and its image cache); otherwise it builds its own copy of the
default one.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.backbones import ServedModels
from lib.core.settings import load_settings
from lib.tpdrseg.infer import TPDRSegInfer
from lib.tpdrseg.served_models import TPDRSegModels
from lib.tpdrseg.train_task import TPDRSegTrainTask


class TPDRSegConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, served: ServedModels = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = load_settings(conf)
        # The default LiteMedSAM's frozen encoder and image cache are shared; None when another checkpoint is served.
        self.shared = (served or ServedModels(self.model_dir, self.settings)).default_litemedsam()
        self.models = TPDRSegModels.from_settings(self.settings, self.model_dir, self.shared)

    def infer(self) -> Dict[str, InferTask]:
        return {"tpdrseg": TPDRSegInfer.from_settings(self.models, self.settings, self.shared)}

    def trainer(self) -> Optional[TrainTask]:
        return {"tpdrseg": TPDRSegTrainTask(os.path.join(self.model_dir, "train", "tpdrseg"), self.models,
                                            device=self.settings["device"])}
