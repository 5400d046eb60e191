"""The TP-DRSeg models the app serves and trains: which weights file a request gets, and the model built from it.

Weights are read on the first request and again whenever the file changes, so a new training result is served at
the next request and the app starts as fast without weights (a missing file is a 503 that says how to make one, not
a failed start). The frozen parts (LiteMedSAM's encoder, the text encoder) are built once and shared by every
weights version: only the few MB of trained tensors differ between versions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from lib.core.cache import LazyModel
from lib.core.device import pick_device
from lib.core.errors import RequestError, bad_request
from lib.core.settings import REPO_ROOT, resolve_path
from lib.tpdrseg.checkpoint import read_weights

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = os.path.join(REPO_ROOT, "lib", "tpdrseg", "weights", "tpdrseg_litemedsam.pt")
TRAINED_WEIGHTS = os.path.join("tpdrseg", "tpdrseg_trained.pt")  # under the app's models folder
# TPDRSeg constructor options kept in a weights file's model config (the rest describe the model).
MODEL_OPTIONS = ("placement", "zoom", "num_sparse_tokens", "generator_hidden", "prior", "prior_hidden",
                 "clip_image_size")
TRAIN_HINT = ("train them with `python -m lib.tpdrseg.training --steps 2000 --output runs/tpdrseg` (synthetic "
              "lesion data: scripts/build_fundus_data.py) and serve that folder with `--conf tpdrseg_weights "
              "runs/tpdrseg`, or train on the datastore's labelled fundus images with POST /train/tpdrseg")


def frozen_litemedsam(shared=None) -> Callable[[torch.device], torch.nn.Module]:
    """The factory of the frozen LiteMedSAM TP-DRSeg's weights were trained on (the default one): the model of
    `shared` (the app's backbone serving those default weights) so that both share it in memory, else a copy."""
    def build(device: torch.device) -> torch.nn.Module:
        if shared is not None:
            return shared.model
        from lib.models.sam import build_litemedsam

        return build_litemedsam(device=device)
    return build


class TPDRSegModels:
    """The served TP-DRSeg, per weights file version; shared by the infer task and (in its own process) the train
    task. `sam_factory(device)` gives the frozen LiteMedSAM the weights were trained on."""

    def __init__(self, configured: str, trained: str, sam_factory: Callable[[torch.device], torch.nn.Module],
                 device=None, lesions_file: str | None = None, clip_weights: str | None = None):
        from lib.tpdrseg.model.descriptions import LesionCatalogue

        self.configured, self.trained = configured, trained
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.catalogue = LesionCatalogue.load(lesions_file or None)
        self.clip_weights = clip_weights or None
        self.sam = LazyModel(sam_factory, self.device, "LiteMedSAM backbone of TP-DRSeg")
        self._encoders: Dict[str, Any] = {}
        self._served: Optional[tuple] = None  # ((path, mtime), model, meta)
        self._lock = threading.Lock()
        self.text_encoder_in_use: Optional[str] = None

    @classmethod
    def from_settings(cls, settings: dict, model_dir: str, shared=None) -> "TPDRSegModels":
        """The app's models: `tpdrseg_weights` (default DEFAULT_WEIGHTS; a relative path is relative to the
        repository), trained weights under `model_dir`, `tpdrseg_lesions`, `tpdrseg_clip_weights`; `shared` as
        `frozen_litemedsam`."""
        configured = resolve_path(settings.get("tpdrseg_weights") or DEFAULT_WEIGHTS, REPO_ROOT)
        lesions = settings.get("tpdrseg_lesions") or None
        return cls(configured, os.path.join(model_dir, TRAINED_WEIGHTS), frozen_litemedsam(shared),
                   device=settings["device"], lesions_file=resolve_path(lesions, REPO_ROOT) if lesions else None,
                   clip_weights=resolve_path(settings.get("tpdrseg_clip_weights") or "", REPO_ROOT) or None)

    # -- which file ----------------------------------------------------------------------------------------------
    def weights_path(self, choice: str = "auto") -> Tuple[str, str]:
        """(path, "trained" | "configured") of the weights a request should use; 503 when absent."""
        if choice not in ("auto", "trained", "configured"):
            raise bad_request(f"'weights' must be auto, trained or configured, got {choice!r}")
        if choice in ("auto", "trained") and os.path.isfile(self.trained):
            return self.trained, "trained"
        if choice == "trained":
            raise RequestError(503, f"no TP-DRSeg weights trained in this app yet ({self.trained}): "
                                    f"POST /train/tpdrseg first, or use weights 'configured'")
        path = self.configured
        if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "tpdrseg.safetensors"))):
            raise RequestError(503, f"TP-DRSeg weights not found at {path}: {TRAIN_HINT}")
        return path, "configured"

    # -- frozen parts ----------------------------------------------------------------------------------------------
    def text_encoder(self, kind: str):
        from lib.tpdrseg.model.text_encoder import build_text_encoder

        if kind not in self._encoders:
            if kind == "clip" and not self.clip_weights:
                raise RequestError(503, "these TP-DRSeg weights use the CLIP text encoder: give its weights with "
                                        "--conf tpdrseg_clip_weights <path to ViT-B-16.pt>")
            self._encoders[kind] = build_text_encoder(kind, self.clip_weights if kind == "clip" else None)
        return self._encoders[kind]

    def build(self, config: Dict[str, Any] | None = None, text_encoder: str = "minilm"):
        """A TP-DRSeg on the shared frozen parts; `config` = a weights file's model config (None: defaults)."""
        from lib.tpdrseg.model.model import TPDRSeg

        config = dict(config or {})
        encoder = self.text_encoder(text_encoder)
        class_text = encoder.encode(self.catalogue.class_texts(config.get("class_text", "description")))
        if config.get("text_dim") not in (None, class_text.shape[1]):
            raise ValueError(f"the weights were trained with {config['text_dim']}-d text, the {text_encoder} "
                             f"encoder gives {class_text.shape[1]}-d")
        kwargs = {k: config[k] for k in MODEL_OPTIONS if k in config}
        if text_encoder == "clip":
            kwargs.setdefault("prior", "clip")
            kwargs["clip"] = encoder.model
        model = TPDRSeg(self.sam.get(), class_text, [c.key for c in self.catalogue], **kwargs)
        model.config["class_text"] = config.get("class_text", "description")
        return model.to(self.device)

    def load(self, path: str):
        """(model, metadata) of a weights file (or folder)."""
        state, meta = read_weights(path)
        config = meta.get("model") or {}
        kind = meta.get("text_encoder") or ("clip" if config.get("prior") == "clip" else "minilm")
        model = self.build(config, kind)
        model.load_trainable_state(state)
        meta = {**meta, "text_encoder": kind}
        return model.eval(), meta

    def served(self, choice: str = "auto"):
        """(model, metadata, path, source) for a request: reloaded when the file changed."""
        path, source = self.weights_path(choice)
        stamp_path = path if os.path.isfile(path) else os.path.join(path, "tpdrseg.safetensors")
        key = (path, os.stat(stamp_path).st_mtime_ns)
        with self._lock:
            if self._served is None or self._served[0] != key:
                start = time.perf_counter()
                try:
                    model, meta = self.load(path)
                except RequestError:
                    raise
                except Exception as e:  # noqa: BLE001 - a bad file is the server's state, not the request's fault
                    logger.exception(f"TP-DRSeg weights {path} could not be loaded")
                    raise RequestError(503, f"TP-DRSeg weights at {path} could not be loaded: {e}. "
                                            f"{TRAIN_HINT[0].upper() + TRAIN_HINT[1:]}") from e
                self._served = (key, model, meta)
                self.text_encoder_in_use = meta["text_encoder"]
                logger.info(f"TP-DRSeg weights {path} ({source}) loaded in {time.perf_counter() - start:.1f}s")
            _, model, meta = self._served
        return model, meta, path, source

    def describe_classes(self) -> list:
        return [{"label": c.label, "key": c.key, "name": c.name, "abbreviation": c.abbreviation,
                 "synonyms": list(c.synonyms), "prompt": c.prompt, "description": c.description}
                for c in self.catalogue]
