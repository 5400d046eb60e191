"""One-Prompt weights files: {"decoder_and_prompt_encoder": fp16 state dict, "seglab": state dict of the SegLab
autoencoder, "config": constructor options}, as scripts/train_oneprompt.py writes them."""

from __future__ import annotations

import os

import torch

from lib.core.errors import RequestError
from lib.core.settings import REPO_ROOT

# The shipped weights (scripts/train_oneprompt.py writes them), served unless `oneprompt_weights` names another file.
DEFAULT_WEIGHTS = os.path.join(REPO_ROOT, "lib", "oneprompt", "weights", "oneprompt_litemedsam.pt")

# Keys of the weights file's "config" that describe rather than configure the model.
DESCRIPTIVE_KEYS = ("encoder",)


def load_oneprompt(path: str, device: torch.device, image_encoder: torch.nn.Module | None = None):
    """The One-Prompt model of a weights file: {"decoder_and_prompt_encoder": fp16 state dict, "seglab": state dict
    of the SegLab autoencoder, "config": constructor options}. Options this code does not know are passed on to
    the model's constructor as they are, so a newer file keeps loading here."""
    from lib.oneprompt.model import OnePromptModel, SegLabAutoencoder, build_oneprompt  # on use: app start stays cheap

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
