"""The served SAM-family models, each built once and shared by every task that runs on it.

`ServedModels` is what the app hands to every config (`init(..., served=...)`): a config asks it for the backbone
of a model by name (model, device, caches, object memory: lib.core.backbone) and for that model's interactive
task, which the MSA adapters fall back to; it never reaches into another config or task.
"""

from __future__ import annotations

import os

from lib.core.backbone import Backbone
from lib.core.stores import LabelStore
from lib.sam.interactive import SamInteractiveInfer
from lib.sammed.click_model import click_model_path_for
from lib.sammed.learned_prompts import LearnedPromptEncoders

LITEMEDSAM = "litemedsam"


def build_litemedsam_model(settings: dict):
    def build(device):
        from lib.models.sam import build_litemedsam  # imported on use: app start stays cheap

        return build_litemedsam(checkpoint=settings.get("litemedsam_checkpoint") or None, device=device)
    return build


def build_meta_sam_model(settings: dict, cache_dir: str):
    def build(device):
        from lib.models.sam import build_sam_vit, resolve_checkpoint

        checkpoint = resolve_checkpoint(settings["sam_checkpoint"], cache_dir=cache_dir)
        return build_sam_vit(settings["sam_variant"], checkpoint=checkpoint, device=device)
    return build


DESCRIPTIONS = {
    LITEMEDSAM: "LiteMedSAM (MedSAM distilled to TinyViT): draw a box or click on a slice",
    "sam": "Segment Anything {variant} (Meta): draw a box or click on a slice",
}


def runtime_cache_dir(model_dir: str, settings: dict) -> str:
    """Where exported encoder graphs are kept: `runtime_cache_dir`, else <models_dir>/runtime."""
    return settings.get("runtime_cache_dir") or os.path.join(model_dir, "runtime")


class ServedModels:
    def __init__(self, model_dir: str, settings: dict):
        self.model_dir = model_dir
        self.settings = settings
        factories = {LITEMEDSAM: build_litemedsam_model(settings)}
        if settings.get("sam_checkpoint"):
            factories[f"sam_{settings['sam_variant']}"] = build_meta_sam_model(settings, model_dir)
        self.runtime_cache_dir = runtime_cache_dir(model_dir, settings)
        self.backbones = {name: Backbone.from_settings(factory, name, settings, self.runtime_cache_dir)
                          for name, factory in factories.items()}
        self._interactive: dict[str, SamInteractiveInfer] = {}
        self._prompt_stores: dict[str, LabelStore] = {}

    def cache_stats(self) -> dict:
        """{model: {cache: its size, limits and hit rate}} of every served model."""
        return {name: backbone.cache_stats() for name, backbone in self.backbones.items()}

    def runtimes(self) -> dict:
        """{model: where its frozen encoder runs}."""
        return {name: backbone.runtime_info() for name, backbone in self.backbones.items()}

    @property
    def names(self) -> list[str]:
        return list(self.backbones)

    def backbone(self, name: str) -> Backbone:
        return self.backbones[name]

    def default_litemedsam(self) -> Backbone | None:
        """The LiteMedSAM backbone when it serves the default weights (One-Prompt and TP-DRSeg were trained on
        those, and share it), else None."""
        return None if self.settings.get("litemedsam_checkpoint") else self.backbones[LITEMEDSAM]

    def prompt_store(self, name: str) -> LabelStore:
        """Where SAMassist keeps what it learned for this model, per label."""
        if name not in self._prompt_stores:
            self._prompt_stores[name] = LabelStore(os.path.join(self.model_dir, "prompts", name))
        return self._prompt_stores[name]

    def click_model_path(self, name: str) -> str | None:
        """The click model's weights for a model (lib.sammed.click_model.click_model_path_for)."""
        return click_model_path_for(name, self.settings)

    def interactive(self, name: str) -> SamInteractiveInfer:
        """The model's click-and-box task, made once (its clicks use SAMassist's learned prompt encoders)."""
        if name not in self._interactive:
            description = (DESCRIPTIONS[LITEMEDSAM] if name == LITEMEDSAM else
                           DESCRIPTIONS["sam"].format(variant=self.settings["sam_variant"].upper()))
            self._interactive[name] = SamInteractiveInfer.from_settings(
                self.backbones[name], description, self.settings,
                prompt_encoders=LearnedPromptEncoders(self.prompt_store(name), self.click_model_path(name)))
        return self._interactive[name]
