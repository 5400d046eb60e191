"""The MONAI Label app: wiring only. Models, transforms and tasks live in lib/ at the repository root."""

import logging
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # MONAI Label puts only this folder on the path; lib/ is beside it
    sys.path.insert(0, REPO_ROOT)

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.config import TaskConfig  # noqa: E402

from lib.configs.litemedsam import LiteMedSAMConfig  # noqa: E402
from lib.configs.meta_sam import MetaSAMConfig  # noqa: E402
from lib.configs.msa import MSAConfig  # noqa: E402
from lib.configs.oneprompt import OnePromptConfig  # noqa: E402
from lib.configs.settings import load_settings, resolve_path  # noqa: E402
from lib.configs.tpdrseg import TPDRSegConfig  # noqa: E402
from lib.errors import not_found  # noqa: E402
from lib.infers.oneprompt_prompts import resolve_label_tags  # noqa: E402

logger = logging.getLogger(__name__)


class PromptableSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        settings = load_settings(conf)
        model_dir = resolve_path(settings["models_dir"], app_dir)
        bases: dict[str, TaskConfig] = {"litemedsam": LiteMedSAMConfig()}
        if settings.get("sam_checkpoint"):
            bases[f"sam_{settings['sam_variant']}"] = MetaSAMConfig()
        self.task_configs: dict[str, TaskConfig] = {}
        for name, config in bases.items():
            config.init(name, model_dir, conf, None)
            adapters = MSAConfig()  # MSA adapters on this model's frozen backbone
            adapters.init(f"{name}_msa", model_dir, conf, None, base=config)
            self.task_configs.update({name: config, f"{name}_msa": adapters})
        oneprompt = OnePromptConfig()  # One-Prompt on LiteMedSAM's encoder (shared with the litemedsam model)
        oneprompt.init("oneprompt", model_dir, conf, None, base=bases["litemedsam"])
        self.task_configs["oneprompt"] = oneprompt
        tpdrseg = TPDRSegConfig()  # TP-DRSeg on LiteMedSAM's frozen encoder (shared with the litemedsam model)
        tpdrseg.init("tpdrseg", model_dir, conf, None, base=bases["litemedsam"])
        self.task_configs["tpdrseg"] = tpdrseg
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Promptable medical SAM",
                         description="Click, box or prompt medical images with SAM-family foundation models",
                         version="0.1.0")

    def init_infers(self):
        infers = {}
        for config in self.task_configs.values():
            infers.update(config.infer())
        return infers

    def init_trainers(self):
        trainers = {}
        for name, config in self.task_configs.items():
            task = config.trainer()
            if task:
                trainers[name] = task
        return trainers

    def infer(self, request, datastore=None):
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore or self.datastore()
            if not store.get_image_uri(image):
                raise not_found(f"unknown image {image!r}: it is not in the datastore")
            resolve_label_tags(request, store)  # One-Prompt's SegLab/doodle prompts may name a label tag ("final")
        return super().infer(request, datastore)
