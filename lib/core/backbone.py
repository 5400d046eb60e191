"""The one shared copy of a promptable model: what every task built on it uses, made once by the configs.

The interactive task, SAMauto, the MSA adapters, One-Prompt and TP-DRSeg all run on the same frozen SAM-family
model. The app builds one `Backbone` per served model and hands it to each task, so they share one model in
memory (built on first use: app start stays cheap), one device, one cache of loaded images, one cache of slice
embeddings and one memory of clicked objects, and no task reaches into another to find them.
"""

from __future__ import annotations

from typing import Callable

import torch

from lib.core.cache import LazyModel, LRUCache
from lib.core.device import pick_device
from lib.core.images import ImageCache, LoadedImage
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor
from lib.core.runtime import FrozenForward, resolve_runtime


def mebibytes(value) -> int | None:
    """A size in MiB from the settings as bytes; None (no byte limit) when empty or 0."""
    return int(float(value) * 2**20) if value not in (None, "", 0, "0") else None


class SamEncoding(torch.nn.Module):
    """A composed SAM's `encode` as a module's forward, for a runtime to export."""

    def __init__(self, sam: torch.nn.Module):
        super().__init__()
        self.sam = sam

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        return self.sam.encode(image01)


class Backbone:
    def __init__(self, model_factory: Callable[[torch.device], torch.nn.Module], name: str = "model",
                 device: str | None = None, image_cache_size: int = 4, embedding_cache_size: int = 64,
                 image_cache_bytes: int | None = None, embedding_cache_bytes: int | None = None,
                 encoder_runtime: str = "eager", runtime_cache_dir: str | None = None):
        """encoder_runtime: where the frozen image encoder runs (lib.core.runtime: auto, eager, torch_bf16,
        openvino_fp32, openvino_bf16); runtime_cache_dir: where its exported graphs are kept."""
        self.name = name
        self.model_factory = model_factory
        self.device = pick_device(device)
        self.lazy_model = LazyModel(model_factory, self.device, name)
        self.encoder_runtime = resolve_runtime(encoder_runtime, self.device)
        self.runtime_cache_dir = runtime_cache_dir
        self._encoder: FrozenForward | None = None
        self.images = ImageCache(image_cache_size, image_cache_bytes)
        self.embeddings = LRUCache(embedding_cache_size, embedding_cache_bytes)
        self.objects = ObjectMemory()
        self.images.on_change.append(self.forget_old_versions)

    @classmethod
    def from_settings(cls, model_factory, name: str, settings: dict, runtime_cache_dir: str | None = None) -> "Backbone":
        """A backbone configured by the app's settings (configs/app.yaml + --conf)."""
        return cls(model_factory, name, device=settings["device"], image_cache_size=settings["image_cache_size"],
                   embedding_cache_size=settings["embedding_cache_size"],
                   image_cache_bytes=mebibytes(settings.get("image_cache_mb")),
                   embedding_cache_bytes=mebibytes(settings.get("embedding_cache_mb")),
                   encoder_runtime=settings.get("encoder_runtime", "auto"), runtime_cache_dir=runtime_cache_dir)

    def cache_stats(self) -> dict:
        return {"images": self.images.images.stats(), "embeddings": self.embeddings.stats()}

    @property
    def model(self) -> torch.nn.Module:
        return self.lazy_model.get()

    def runtime_info(self) -> dict:
        return self._encoder.info() if self._encoder is not None else {"runtime": self.encoder_runtime, "graphs": [], "eager_fallback": []}

    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        """The frozen model's `encode` (B, 3, S, S) in [0, 1] -> embedding, through the backbone's runtime."""
        if self._encoder is None:
            self._encoder = FrozenForward(SamEncoding(self.model), self.encoder_runtime, self.runtime_cache_dir,
                                          name=f"{self.name}-encoder")
        return self._encoder(image01)

    def image(self, path: str) -> tuple[LoadedImage, bool]:
        """(the loaded image, whether it was cached)."""
        return self.images.get(path)

    def predictor(self, settings: PredictorSettings, model: torch.nn.Module | None = None) -> PromptPredictor:
        """A predictor on the shared caches: of the model itself, or of `model` (an adapted copy that shares its
        tensors, keyed apart through EmbeddingKey.encoder)."""
        if model is not None:
            return PromptPredictor(model, self.device, self.embeddings, self.objects, settings)
        return PromptPredictor(self.model, self.device, self.embeddings, self.objects, settings, encode=self.encode)

    def forget_old_versions(self, fingerprint: tuple) -> None:
        """Drop what was computed from an image file's content before it changed."""
        self.embeddings.discard_where(lambda k: k.of_other_version(fingerprint))
        self.objects.discard_where(lambda k: k[0].of_other_version(fingerprint))

    def clear(self) -> None:
        self.images.clear()
        self.embeddings.clear()
        self.objects.discard_where(lambda k: True)
