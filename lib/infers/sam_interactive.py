"""MONAI Label infer task: clicks or a box on one slice -> a label volume in the image's geometry.

The request path is kept short on purpose (MONAI Label runs /infer on its event loop): the loaded image, its
intensity range and each slice's embedding are cached; the result is written with a fast writer. Nothing heavy
happens at app start: the model is built on the first request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..errors import bad_request, not_found
from ..transforms.geometry import in_plane_axes
from ..volumes import LoadedImage, load_image, fingerprint, write_label
from .cache import LazyModel, LRUCache
from ..trainers.label_store import LabelStore
from .predictor import ObjectMemory, PredictorSettings, PromptPredictor
from .prompts import parse_prompt

logger = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for and present), else CPU; never fails on a CPU-only machine."""
    if requested and str(requested).startswith("cuda") and torch.cuda.is_available():
        return torch.device(requested)
    if requested in (None, "", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class SamInteractiveInfer(InferTask):
    """Promptable 2D segmentation with a SAM-family model, slice by slice on 3D volumes."""

    def __init__(self, model_factory: Callable[[torch.device], torch.nn.Module], labels=("object",),
                 description: str = "Promptable medical SAM: clicks or a box on a slice",
                 device: str | None = None, image_cache_size: int = 4, embedding_cache_size: int = 64,
                 settings: PredictorSettings | None = None, default_modality: str | None = None,
                 default_ct_window=None, prompt_store: LabelStore | None = None):
        settings = settings or PredictorSettings()
        super().__init__(
            type=InferType.DEEPGROW,  # Slicer and OHIF show a click/box tool for deepgrow-type models
            labels=list(labels),
            dimension=2,  # one slice per request: Slicer then sends that slice's points and merges the slice
            description=description,
            config={"modality": default_modality or "", "ct_window": default_ct_window or "soft_tissue",
                    "axis": 2, "zoom": settings.zoom, "prompt_encoder": "auto"},
        )
        self.model_factory = model_factory
        self.device = pick_device(device)
        self.images = LRUCache(image_cache_size)
        self.embeddings = LRUCache(embedding_cache_size)
        self.objects = ObjectMemory()
        self.prompt_store = prompt_store
        self.settings = settings
        self.lazy_model = LazyModel(model_factory, self.device, "model")

    @classmethod
    def from_settings(cls, model_factory, description: str, settings: dict,
                      prompt_store: LabelStore | None = None) -> "SamInteractiveInfer":
        """A task configured by the app's settings (configs/app.yaml + --conf)."""
        return cls(model_factory, description=description, device=settings["device"], prompt_store=prompt_store,
                   image_cache_size=settings["image_cache_size"], embedding_cache_size=settings["embedding_cache_size"],
                   default_modality=settings["modality"], default_ct_window=settings["ct_window"],
                   settings=PredictorSettings(zoom=settings["zoom"]))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        # What SAMassist learned, per label: /info shows it to clients and data managers.
        info["learned_prompts"] = self.prompt_store.info() if self.prompt_store else {}
        return info

    @property
    def model(self) -> torch.nn.Module:
        return self.lazy_model.get()

    def learned_encoder(self, label: str | None, prompt, choice: str):
        """The label's learned prompt encoder (SAMassist) when it should answer this prompt, else None (vanilla).

        "auto": learned for clicks, vanilla for a box. The learned encoder is what makes clicks work on a box-trained
        model; for boxes, and boxes with corrective clicks, the vanilla one scored higher in validation on our data
        (README), so a box keeps the behaviour the model was trained for. "learned"/"vanilla" force either."""
        if choice not in ("auto", "learned", "vanilla"):
            raise bad_request(f"'prompt_encoder' must be auto, learned or vanilla, got {choice!r}")
        if choice == "vanilla" or (choice == "auto" and prompt.box is not None) or not self.prompt_store:
            return None
        encoder = self.prompt_store.encoder_for(label, self.model.prompt_encoder)
        if encoder is None and choice == "learned":
            raise not_found(f"no learned prompt encoder for label {label!r}: train one with POST /train/")
        return encoder

    def predictor(self, zoom: bool) -> PromptPredictor:
        settings = self.settings if zoom == self.settings.zoom else dataclasses.replace(self.settings, zoom=zoom)
        return PromptPredictor(self.model, self.device, self.embeddings, self.objects, settings)

    def clear_cache(self) -> None:
        self.images.clear()
        self.embeddings.clear()
        self.objects.discard_where(lambda k: True)

    # -- request ---------------------------------------------------------------------------------------------
    def image(self, path: str) -> tuple[LoadedImage, bool]:
        key = fingerprint(path)
        # A changed file has a new fingerprint; drop what was cached for its old content.
        stale = lambda k: k[0] == key[0] and k != key
        if self.images.discard_where(stale):
            changed = lambda k: k[1][0] == key[0] and k[1] != key
            self.embeddings.discard_where(changed)
            self.objects.discard_where(changed)
        return self.images.get_or_compute(key, lambda: load_image(key[0]))

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        req = {**self.config(), **request}
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        image, image_hit = self.image(path)
        load_ms = (time.perf_counter() - begin) * 1000

        prompt = parse_prompt(req, image.spatial_shape)
        try:
            range_key, intensity = image.intensity(req.get("modality") or None, req.get("ct_window"))
        except ValueError as e:
            raise bad_request(str(e)) from e
        modality = range_key[0]
        slice_image = image.normalised_slice(prompt.axis, prompt.index, intensity)
        cache_key = ("model", image.fingerprint, range_key, prompt.axis, prompt.index)
        label_name = req.get("label") or None
        learned = self.learned_encoder(label_name, prompt, req.get("prompt_encoder") or "auto")
        mask, info = self.predictor(truthy(req.get("zoom", True))).predict(slice_image, prompt, cache_key, learned)

        try:
            label_value = int(req.get("label_value", 1))
        except (TypeError, ValueError) as e:
            raise bad_request(f"'label_value' must be an integer, got {req.get('label_value')!r}") from e
        label = self._to_volume(mask.astype(np.uint8) * label_value, image, prompt.axis, prompt.index)
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
            "learned_prompt": label_name if learned is not None else None,
            "zoom": {"applied": info["zoomed"], "window_rc": info["window"]},
            "box_rc": info["box_rc"], "predicted_iou": info["predicted_iou"],
            "device": str(self.device),
            "latencies": {"load_ms": round(load_ms, 1), "model_ms": info["model_ms"], "write_ms": round(write_ms, 1),
                          "total_ms": round((time.perf_counter() - begin) * 1000, 1)},
        }
        logger.info(f"infer {path}: slice {prompt.index} axis {prompt.axis} -> {result['mask_voxels']} voxels; "
                    f"{result['latencies']} cache {result['cache']}")
        return path_out, result

    @staticmethod
    def _to_volume(mask: np.ndarray, image: LoadedImage, axis, index) -> np.ndarray:
        """Put a (rows, cols) slice mask back into an empty label of the image's spatial shape."""
        if axis is None:
            return np.ascontiguousarray(mask.T)
        label = np.zeros(image.spatial_shape, dtype=mask.dtype)
        col_axis, row_axis = in_plane_axes(axis)
        plane = [slice(None)] * 3
        plane[axis] = index
        label[tuple(plane)] = mask.T  # (rows, cols) -> (col_axis, row_axis) order of the remaining axes
        return label


def truthy(value) -> bool:
    return str(value).strip().lower() not in ("0", "false", "no", "off", "")
