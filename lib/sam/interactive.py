"""MONAI Label infer task: clicks or a box on one slice -> a label volume in the image's geometry.

The request path is kept short on purpose (MONAI Label runs /infer on its event loop): the loaded image, its
intensity range and each slice's embedding are cached; the result is written with a fast writer. Nothing heavy
happens at app start: the model is built on the first request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Protocol, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core import requests
from lib.core.backbone import Backbone
from lib.core.cache import EmbeddingKey
from lib.core.errors import bad_request, not_found
from lib.core.images import image_kind, write_label
from lib.core.predictor import PredictorSettings, PromptPredictor
from lib.core.prompts import SlicePrompt, parse_prompt
from lib.core.transforms.geometry import paste_slice

logger = logging.getLogger(__name__)


class PromptEncoderChoice(Protocol):
    """Which prompt encoder answers a request (SAMassist's learned ones, injected by the configs): None for the
    model's own."""

    def encoder_for(self, model: torch.nn.Module, label: str | None, prompt: SlicePrompt, choice: str,
                    image_kind: str | None = None): ...

    def info(self) -> dict: ...

    def click_model_info(self) -> dict: ...


class SamInteractiveInfer(InferTask):
    """Promptable 2D segmentation with a SAM-family model, slice by slice on 3D volumes."""

    def __init__(self, backbone: Backbone, labels=("object",),
                 description: str = "Promptable medical SAM: clicks or a box on a slice",
                 settings: PredictorSettings | None = None, default_modality: str | None = None,
                 default_ct_window=None, prompt_encoders: PromptEncoderChoice | None = None):
        settings = settings or PredictorSettings()
        super().__init__(
            type=InferType.DEEPGROW,  # Slicer and OHIF show a click/box tool for deepgrow-type models
            labels=list(labels),
            dimension=2,  # one slice per request: Slicer then sends that slice's points and merges the slice
            description=description,
            config={"modality": default_modality or "", "ct_window": default_ct_window or "soft_tissue",
                    "axis": 2, "zoom": settings.zoom, "prompt_encoder": "auto"},
        )
        self.backbone = backbone
        self.prompt_encoders = prompt_encoders
        self.settings = settings

    @classmethod
    def from_settings(cls, backbone: Backbone, description: str, settings: dict,
                      prompt_encoders: PromptEncoderChoice | None = None) -> "SamInteractiveInfer":
        """A task configured by the app's settings (configs/app.yaml + --conf)."""
        return cls(backbone, description=description, prompt_encoders=prompt_encoders,
                   default_modality=settings["modality"], default_ct_window=settings["ct_window"],
                   settings=PredictorSettings(zoom=settings["zoom"]))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        # What SAMassist learned, per label: /info shows it to clients and data managers.
        info["learned_prompts"] = self.prompt_encoders.info() if self.prompt_encoders else {}
        info["click_model"] = self.prompt_encoders.click_model_info() if self.prompt_encoders else {"available": False}
        return info

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def predictor(self, zoom: bool) -> PromptPredictor:
        settings = self.settings if zoom == self.settings.zoom else dataclasses.replace(self.settings, zoom=zoom)
        return self.backbone.predictor(settings)

    def _encoder_name(self, encoder) -> str:
        """Which prompt encoder answered: the label's learned one, the click model, or the model's own."""
        if encoder is None:
            return "vanilla"
        if self.prompt_encoders and encoder is self.prompt_encoders.click_model(self.model.prompt_encoder):
            return "click_model"
        return "learned"

    # -- request ---------------------------------------------------------------------------------------------
    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        req = {**self.config(), **request}
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        image, image_hit = self.backbone.image(path)
        load_ms = (time.perf_counter() - begin) * 1000

        prompt = parse_prompt(req, image.spatial_shape)
        try:
            range_key, intensity = image.intensity(req.get("modality") or None, req.get("ct_window"))
        except ValueError as e:
            raise bad_request(str(e)) from e
        modality = range_key[0]
        label_value = requests.label_value(req)
        slice_image = image.normalised_slice(prompt.axis, prompt.index, intensity)
        cache_key = EmbeddingKey(image.fingerprint, range_key, prompt.axis, prompt.index)
        label_name = req.get("label") or None
        learned = (self.prompt_encoders.encoder_for(self.model, label_name, prompt, req.get("prompt_encoder") or "auto",
                                                    image_kind(modality, image)) if self.prompt_encoders else None)
        predictor = self.predictor(requests.flag(req, "zoom", True))
        mask, info = predictor.predict(slice_image, prompt, cache_key, learned)
        encoder_name = self._encoder_name(learned)

        label = paste_slice(mask.astype(np.uint8) * label_value, image.spatial_shape, prompt.axis, prompt.index)
        write_start = time.perf_counter()
        path_out = write_label(label, image, req.get("result_extension"), req.get("result_dtype"))
        write_ms = (time.perf_counter() - write_start) * 1000

        result = {
            # Slicer names the segment being edited in `label`; answer in its terms.
            "label_names": {str(label_name or self.labels[0]): label_value},
            "slice": prompt.index, "axis": prompt.axis, "modality": modality,
            "mask_voxels": int(mask.sum()),
            "cache": {"image_hit": image_hit, "embedding_hit": info["encoder_runs"] == 0,
                      "encoder_runs": info["encoder_runs"]},
            "prompt": "box" if prompt.box is not None else "clicks",
            "refined_object": info.get("object_memory", False),
            "learned_prompt": label_name if encoder_name == "learned" else None,
            "prompt_encoder": encoder_name,
            "zoom": {"applied": info["zoomed"], "window_rc": info["window"]},
            "box_rc": info["box_rc"], "predicted_iou": info["predicted_iou"],
            "device": str(self.backbone.device),
            "latencies": {"load_ms": round(load_ms, 1), "model_ms": info["model_ms"], "write_ms": round(write_ms, 1),
                          "total_ms": round((time.perf_counter() - begin) * 1000, 1)},
        }
        logger.info(f"infer {path}: slice {prompt.index} axis {prompt.axis} -> {result['mask_voxels']} voxels; "
                    f"{result['latencies']} cache {result['cache']}")
        return path_out, result
