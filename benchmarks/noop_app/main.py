"""Reference for the HTTP benchmark: MONAI Label's plain request path with a model that does nothing.

A BasicInferTask whose "model" returns an empty label: what remains is MONAI Label's own cost per request
(LoadImaged of the whole volume, its Writer of the whole label). Used only by benchmarks/bench_server.py.
"""

import numpy as np
from monai.transforms import EnsureChannelFirstd, LoadImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask


class NoOpInfer(BasicInferTask):
    def __init__(self):
        super().__init__(path=None, network=None, type=InferType.DEEPGROW, labels=["object"], dimension=2,
                         description="no-op reference")

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data=None):
        return [LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")]

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        data["pred"] = np.zeros(data["image"].shape[1:], dtype=np.uint8)
        return data

    def inverse_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []


class NoOpApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="no-op reference")

    def init_infers(self):
        return {"noop": NoOpInfer()}
