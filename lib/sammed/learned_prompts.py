"""SAMassist serving: a label's learned prompt encoder answers the clicks on that label; the shipped click model
answers the clicks on every other label.

The interactive task asks this object which prompt encoder to use (the configs inject it); the encoders are the
ones the SAMassist train task saved in the label store, picked up at the next request with no restart, and the
click model (lib/sammed/click_model.py), loaded once at the first click.
"""

from __future__ import annotations

import copy
import os
import threading

import torch

from lib.core.errors import bad_request, not_found
from lib.core.prompts import SlicePrompt
from lib.core.settings import REPO_ROOT, resolve_path
from lib.core.stores import LabelStore
from lib.core.training import auto_choice, prompt_kind
from lib.sammed.click_model import WEIGHTS as CLICK_MODEL_WEIGHTS, load_click_model, served_image_kinds

CHOICES = ("auto", "learned", "vanilla", "click_model")


def load_learned_encoder(store: LabelStore, label: str | None, template: torch.nn.Module):
    """The learned prompt encoder for a label (a copy of `template` with the stored weights), or None."""
    def build(state):
        encoder = copy.deepcopy(template)
        encoder.load_state_dict(state, strict=True)
        return encoder.eval().requires_grad_(False)

    return store.load(label, "main", build, next(template.parameters()).device)


class LearnedPromptEncoders:
    def __init__(self, store: LabelStore, click_model_path: str | None = None):
        """click_model_path: the click model's weights for this model (None: clicks on untaught labels go to the
        box search)."""
        self.store = store
        self.click_model_path = click_model_path
        self._click_model = None
        self._click_image_kinds: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def info(self) -> dict:
        return self.store.info()

    def click_model_info(self) -> dict:
        """What the click model is: its file and what it learned from (/info)."""
        if not self.click_model_path or not os.path.isfile(self.click_model_path):
            return {"available": False}
        state = torch.load(self.click_model_path, map_location="cpu", weights_only=True)
        return {"available": True, "weights": os.path.basename(self.click_model_path),
                "image_kinds": list(served_image_kinds(state)), "trained_on": state.get("trained_on"),
                "steps": state.get("settings", {}).get("steps"), "slices": state.get("slices"),
                "targets": state.get("targets")}

    def click_model(self, template: torch.nn.Module, image_kind: str | None = None):
        """The click model as a copy of `template` (the served model's prompt encoder), loaded once; or None. With
        an image kind ("MR/3D": lib.core.images.image_kind): None unless the click model answers that kind (where
        the benchmark measured it better than the box search)."""
        if not self.click_model_path:
            return None
        with self._lock:
            if self._click_model is None:
                self._click_model = load_click_model(template, self.click_model_path)
                if self._click_model is not None:
                    self._click_image_kinds = served_image_kinds(
                        torch.load(self.click_model_path, map_location="cpu", weights_only=True))
            if image_kind is not None and image_kind not in self._click_image_kinds:
                return None
            return self._click_model

    def encoder_for(self, model: torch.nn.Module, label: str | None, prompt: SlicePrompt, choice: str,
                    image_kind: str | None = None):
        """The prompt encoder that should answer this prompt, else None (the model's own: a box as it was trained
        on, clicks through the box search).

        "auto": per kind of prompt (clicks, a box, a box with clicks), the label's learned encoder (SAMassist)
        where its validation scored it better than the baseline, else the baseline: the click model for clicks (the
        box search without one), the vanilla encoder for a box (auto_prompt_encoder). "learned", "click_model" and
        "vanilla" force one."""
        if choice not in CHOICES:
            raise bad_request(f"'prompt_encoder' must be one of {', '.join(CHOICES)}, got {choice!r}")
        if choice == "auto":
            return auto_prompt_encoder(self, model, label, prompt, image_kind)
        if choice == "vanilla":
            return None
        if choice == "click_model":
            encoder = self.click_model(model.prompt_encoder)
            if encoder is None:
                raise not_found("this model has no click model (only LiteMedSAM with its default weights has one)")
            return encoder
        encoder = load_learned_encoder(self.store, label, model.prompt_encoder)
        if encoder is None:
            raise not_found(f"no learned prompt encoder for label {label!r}: train one with POST /train/")
        return encoder


# What `auto` answers each kind of prompt with when the validation cannot say (no figures, or a tie): clicks the
# learned encoder (it is what makes clicks work on a box-trained model); a box, alone or with corrective clicks, the
# vanilla one (on the Colin27 putamen and thalamus it scored higher there: README, SAM^Med).
AUTO_DEFAULT = {"click": "learned", "box": "vanilla", "box_then_clicks": "vanilla"}


def samassist_auto_choice(validation: dict | None) -> dict[str, str]:
    """Per prompt kind, "learned" or "vanilla" (the baseline: what answers without the learned encoder)."""
    return auto_choice(validation, "learned", "vanilla", AUTO_DEFAULT)


def auto_prompt_encoder(encoders: LearnedPromptEncoders, model: torch.nn.Module, label: str | None,
                        prompt: SlicePrompt, image_kind: str | None = None):
    """`auto`: the label's learned encoder for the kinds of prompt where it validated better than the baseline
    (samassist_auto_choice on its stored validation); else, or for a label without one, the baseline: the click
    model for clicks alone (None, the box search, without one), None (the vanilla encoder) where a box is given."""
    kind = prompt_kind(prompt.box is not None, len(prompt.foreground) + len(prompt.background) > 0)
    baseline = encoders.click_model(model.prompt_encoder, image_kind) if kind == "click" else None
    meta = encoders.store.meta(label) if label else None
    if meta is None or samassist_auto_choice(meta.get("validation"))[kind] != "learned":
        return baseline
    encoder = load_learned_encoder(encoders.store, label, model.prompt_encoder)
    return encoder if encoder is not None else baseline


def click_model_path_for(model_name: str | None, settings: dict) -> str | None:
    """The click model's weights for a served model, as the app decides them (lib/configs/backbones.py,
    ServedModels.click_model_path): LiteMedSAM with its default weights only (no `litemedsam_checkpoint`; the
    click model was learned on them); `click_model_weights` names another file, or `none`."""
    if model_name != "litemedsam" or settings.get("litemedsam_checkpoint"):
        return None
    configured = str(settings.get("click_model_weights") or "")
    if configured.lower() == "none":
        return None
    return resolve_path(configured, REPO_ROOT) if configured else CLICK_MODEL_WEIGHTS
