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
from lib.core.stores import LabelStore
from lib.core.training import prompt_kind
from lib.sammed.click_model import click_model_encoder, read_click_model, served_image_kinds
from lib.sammed.samassist import samassist_auto_choice

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
        self._click_state: dict | None = None  # the click model's file, read once
        self._click_model = None
        self._lock = threading.Lock()

    def info(self) -> dict:
        return self.store.info()

    def _click_file(self) -> dict | None:
        """The click model's file (weights and what it learned from), read once; None without one."""
        if self._click_state is None and self.click_model_path:
            self._click_state = read_click_model(self.click_model_path) or {}
        return self._click_state or None

    def click_model_info(self) -> dict:
        """What the click model is: its file and what it learned from (/info)."""
        with self._lock:
            state = self._click_file()
        if state is None:
            return {"available": False}
        return {"available": True, "weights": os.path.basename(self.click_model_path),
                "image_kinds": list(served_image_kinds(state)), "trained_on": state.get("trained_on"),
                "steps": state.get("settings", {}).get("steps"), "slices": state.get("slices"),
                "targets": state.get("targets")}

    def click_model(self, template: torch.nn.Module, image_kind: str | None = None):
        """The click model as a copy of `template` (the served model's prompt encoder), built once; or None. With
        an image kind ("MR/3D": lib.core.images.image_kind): None unless the click model answers that kind (where
        the benchmark measured it better than the box search)."""
        with self._lock:
            state = self._click_file()
            if state is None:
                return None
            if self._click_model is None:
                self._click_model = click_model_encoder(template, state)
        if image_kind is not None and image_kind not in served_image_kinds(state):
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
