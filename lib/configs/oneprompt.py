"""One-Prompt (paper 003) served as model `oneprompt`: templates registered once, then segmentation of new slices
and images from them (modes in lib/infers/oneprompt.py).

The weights (`oneprompt_weights`, default lib/models/oneprompt/weights/oneprompt_litemedsam.pt, as written by
scripts/train_oneprompt.py) are read on the first request, so the app starts as fast without them and a missing
file is a 503 on use, not a failed start. The decoder was trained on the frozen default LiteMedSAM TinyViT, so
when the app serves that encoder (no `litemedsam_checkpoint`) One-Prompt shares it in memory with the `litemedsam`
model; with another LiteMedSAM checkpoint it builds its own copy of the default one. Templates are kept under
<models>/oneprompt/templates/.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..errors import RequestError
from ..infers.oneprompt import OnePromptInfer
from ..infers.oneprompt_templates import TemplateStore
from .settings import REPO_ROOT, load_settings, resolve_path

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = os.path.join(REPO_ROOT, "lib", "models", "oneprompt", "weights", "oneprompt_litemedsam.pt")
# Keys of the weights file's "config" that describe rather than configure the model.
DESCRIPTIVE_KEYS = ("encoder",)


def load_oneprompt(path: str, device: torch.device, image_encoder: torch.nn.Module | None = None):
    """The One-Prompt model of a weights file: {"decoder_and_prompt_encoder": fp16 state dict, "seglab": state dict
    of the SegLab autoencoder, "config": constructor options}. Options this code does not know are passed on to
    the model's constructor as they are, so a newer file keeps loading here."""
    from ..models.oneprompt import OnePromptModel, SegLabAutoencoder, build_oneprompt

    if not os.path.isfile(path):
        raise RequestError(503, f"One-Prompt weights not found at {path}: train them with "
                                f"scripts/train_oneprompt.py, or name a file with --conf oneprompt_weights <path>")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "decoder_and_prompt_encoder" not in state:
        raise RequestError(503, f"{path} is not a One-Prompt weights file (no 'decoder_and_prompt_encoder')")
    kwargs = {k: _tuples(v) for k, v in (state.get("config") or {}).items() if k not in DESCRIPTIVE_KEYS}
    seglab = None
    if state.get("seglab"):
        seglab = SegLabAutoencoder()
        seglab.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["seglab"].items()})
    model = (OnePromptModel(image_encoder, seglab=seglab, **kwargs) if image_encoder is not None
             else build_oneprompt(seglab=seglab, **kwargs))
    missing, unexpected = model.load_state_dict(state["decoder_and_prompt_encoder"], strict=False)
    missing = [k for k in missing if not k.startswith("image_encoder.")]
    if missing or unexpected:
        raise RequestError(503, f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def _tuples(value):
    """JSON-ish lists (levels [["neck", 16], ...]) back to the tuples the constructor documents."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class OnePromptConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, base: TaskConfig | None = None,
             **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.base = base  # the LiteMedSAM config, whose image encoder (and image cache) One-Prompt shares
        self.settings = load_settings(conf)
        self.weights = resolve_path(self.settings.get("oneprompt_weights") or DEFAULT_WEIGHTS, REPO_ROOT)
        self.store = TemplateStore(os.path.join(self.model_dir, "oneprompt", "templates"))

    def build_model(self, device: torch.device):
        encoder = None
        if self.base is not None and not self.settings.get("litemedsam_checkpoint"):
            encoder = self.base.interactive_task().model.image_encoder  # the default LiteMedSAM, already served
        return load_oneprompt(self.weights, device, encoder)

    def infer(self) -> Dict[str, InferTask]:
        image_loader = self.base.interactive_task().image if self.base is not None else None
        return {self.name: OnePromptInfer(
            self.build_model, self.store, device=self.settings["device"], image_loader=image_loader,
            feature_cache_size=int(self.settings.get("oneprompt_feature_cache_size") or 32),
            default_modality=self.settings["modality"], default_ct_window=self.settings["ct_window"],
            description="One-Prompt: register a prompted slice as a template (mode register), then segment "
                        "volumes and images with it (segment), or prompt a slice (interactive, everything)")}

    def trainer(self) -> Optional[TrainTask]:
        return None  # trained offline: scripts/train_oneprompt.py
