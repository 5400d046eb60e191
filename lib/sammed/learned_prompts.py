"""SAMassist serving: a label's learned prompt encoder answers the clicks on that label.

The interactive task asks this object which prompt encoder to use (the configs inject it); the encoders are the
ones the SAMassist train task saved in the label store, picked up at the next request with no restart.
"""

from __future__ import annotations

import copy

import torch

from lib.core.errors import bad_request, not_found
from lib.core.prompts import SlicePrompt
from lib.core.stores import LabelStore

CHOICES = ("auto", "learned", "vanilla")


def load_learned_encoder(store: LabelStore, label: str | None, template: torch.nn.Module):
    """The learned prompt encoder for a label (a copy of `template` with the stored weights), or None."""
    def build(state):
        encoder = copy.deepcopy(template)
        encoder.load_state_dict(state, strict=True)
        return encoder.eval().requires_grad_(False)

    return store.load(label, "main", build, next(template.parameters()).device)


class LearnedPromptEncoders:
    def __init__(self, store: LabelStore):
        self.store = store

    def info(self) -> dict:
        return self.store.info()

    def encoder_for(self, model: torch.nn.Module, label: str | None, prompt: SlicePrompt, choice: str):
        """The label's learned prompt encoder when it should answer this prompt, else None (the model's own).

        "auto": learned for clicks, vanilla for a box. The learned encoder is what makes clicks work on a
        box-trained model; for boxes, and boxes with corrective clicks, the vanilla one scored higher in
        validation on our data (README), so a box keeps the behaviour the model was trained for.
        "learned"/"vanilla" force either."""
        if choice not in CHOICES:
            raise bad_request(f"'prompt_encoder' must be auto, learned or vanilla, got {choice!r}")
        if choice == "vanilla" or (choice == "auto" and prompt.box is not None):
            return None
        encoder = load_learned_encoder(self.store, label, model.prompt_encoder)
        if encoder is None and choice == "learned":
            raise not_found(f"no learned prompt encoder for label {label!r}: train one with POST /train/")
        return encoder
