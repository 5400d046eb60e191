"""TP-DRSeg (Li et al., MICCAI 2024) served as model `tpdrseg`: typed text -> a diabetic-retinopathy lesion mask on a
fundus image.

Request parameters (POST /infer/tpdrseg?image=<id>, JSON `params`):
- `text` (or `label`, used when `text` is absent): what to segment. A class name, abbreviation or synonym of
  configs/lesions.yaml ("hard exudates", "EX", "hard exudate", "cotton wool spots", typos in long words...) is
  mapped through `LesionCatalogue.match` to its class, and the class's configured explicit description is what the
  model reads; any other text is embedded as typed ("free text"). `all` (or no text at all) answers every configured
  class at once: one multi-label result with `label_names`. An empty text, or one with no words left to embed
  (e.g. "the"), is a 400 that lists the known classes (lib/tpdrseg/text_prompts.py).
- `threshold` (0.5): on the per-pixel probability. With `all`, a pixel above it for several classes takes the most
  probable one.
- `label_value`: the output value of a single-class result (default: the class's label in configs/lesions.yaml,
  1 MA, 2 HE, 3 EX, 4 SE; 1 for free text).
- `slice`, `axis` (default 2): for a volume, the slice to segment (default: the middle one); the answer is a label
  volume with only that slice set. 2D images (the usual fundus photograph) are answered whole.
- `weights`: `auto` (default: the weights trained through POST /train/tpdrseg in the models folder when present,
  else the configured `tpdrseg_weights`), `trained` or `configured` (lib/tpdrseg/served_models.py).
- `result_extension`, `result_dtype`: as the other models (a 2D image's label is a PNG by default).

The result JSON says what was read: `prompt.mode` is "class" (with `matched`: the class, and `embedded`: the
description the model read), "free text" (`embedded` = the typed text) or "all"; `classes` gives each answered
class's pixels and highest probability.

RGB photographs are read as they were in training (0-255 -> [0, 1]); a grey slice is repeated to three channels; the
image <-> model geometry is training's own (lib/tpdrseg/preprocessing.py), so the mask has the image's own shape.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core import requests
from lib.core.errors import bad_request, not_found
from lib.core.images import ImageCache, LoadedImage, write_label
from lib.core.transforms.geometry import paste_slice
from lib.tpdrseg.preprocessing import model_input, probabilities_back
from lib.tpdrseg.served_models import TPDRSegModels
from lib.tpdrseg.text_prompts import parse_text

logger = logging.getLogger(__name__)

DESCRIPTION = ("TP-DRSeg: type a diabetic-retinopathy lesion (microaneurysms, haemorrhages, hard or soft exudates, a "
               "synonym, or free text; 'all' for every class) and get its mask on a fundus photograph")


class TPDRSegInfer(InferTask):
    def __init__(self, models: TPDRSegModels, description: str = "TP-DRSeg: type a DR lesion, get its mask",
                 image_loader: Callable[[str], tuple[LoadedImage, bool]] | None = None, threshold: float = 0.5,
                 text_encoder: str = "minilm"):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={c.key: c.label for c in models.catalogue},
            dimension=2,
            description=description,
            config={"text": "all", "threshold": threshold, "axis": 2, "weights": "auto"},
        )
        self.models = models
        self.configured_text_encoder = text_encoder
        self.image_loader = image_loader or ImageCache(4).get

    @classmethod
    def from_settings(cls, models: TPDRSegModels, settings: dict, shared=None) -> "TPDRSegInfer":
        """The app's task: default threshold `tpdrseg_threshold` (0.5 when it is not a number); images through the
        cache of `shared` (the backbone TP-DRSeg shares its frozen LiteMedSAM with) when there is one."""
        try:
            threshold = float(settings.get("tpdrseg_threshold", 0.5))
        except (TypeError, ValueError):
            threshold = 0.5
        return cls(models, description=DESCRIPTION, image_loader=shared.image if shared is not None else None,
                   threshold=threshold, text_encoder="clip" if models.clip_weights else "minilm")

    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        trained_meta = None
        sidecar = os.path.splitext(self.models.trained)[0] + ".json"
        if os.path.isfile(sidecar):
            try:
                with open(sidecar) as f:
                    meta = json.load(f)
                trained_meta = {k: meta.get(k) for k in ("trained_at", "steps", "images", "validation",
                                                         "initialised_from")}
            except (OSError, ValueError):
                trained_meta = None
        info.update({
            "classes": self.models.describe_classes(),
            "text_encoder": self.models.text_encoder_in_use or self.configured_text_encoder,
            "text_encoder_loaded": self.models.text_encoder_in_use is not None,
            "weights": {"configured": self.models.configured,
                        "configured_present": os.path.exists(self.models.configured),
                        "trained": self.models.trained, "trained_present": os.path.isfile(self.models.trained),
                        "trained_info": trained_meta},
            "text_matching": "class names, abbreviations and synonyms of configs/lesions.yaml (case, plurals, "
                             "spelling and small typos ignored) select the class's description; other text is "
                             "embedded as typed; 'all' answers every class",
        })
        return info

    # -- request ---------------------------------------------------------------------------------------------------
    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        req = {**self.config(), **request}
        typed = request.get("text") if request.get("text") is not None else request.get("label")
        prompt = parse_text(typed, self.models.catalogue)
        threshold = requests.number(req, "threshold", 0.5)
        if not 0.0 < threshold < 1.0:
            raise bad_request(f"'threshold' must be between 0 and 1, got {threshold}")
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        model, meta, weights_path, source = self.models.served(str(req.get("weights") or "auto"))
        load_start = time.perf_counter()
        image, image_hit = self.image_loader(path)
        axis, index = self._slice(req, image)
        try:
            _, intensity = image.intensity("RGB" if image.is_rgb else (req.get("modality") or None),
                                           req.get("ct_window"))
        except ValueError as e:
            raise bad_request(str(e)) from e
        slice_image = image.normalised_slice(axis, index, intensity)  # (C, rows, cols) in [0, 1]
        rows, cols = slice_image.shape[-2:]
        x, side = model_input(slice_image, model.image_size)
        load_ms = (time.perf_counter() - load_start) * 1000

        model_start = time.perf_counter()
        device = next(model.mask_decoder.parameters()).device
        with torch.no_grad():
            if prompt.mode == "all":
                logits = model(x[None].to(device))
            elif prompt.mode == "class":
                logits = model(x[None].to(device), classes=[model.class_names.index(prompt.cls.key)])
            else:
                text = self.models.text_encoder(meta["text_encoder"]).encode([prompt.typed])
                logits = model(x[None].to(device), text=text)
        probs = probabilities_back(torch.sigmoid(logits[0].float()).cpu(), side, rows, cols).numpy()
        model_ms = (time.perf_counter() - model_start) * 1000

        classes = []
        if prompt.mode == "all":
            values = np.array([c.label for c in self.models.catalogue], np.int64)
            best = probs.argmax(0)
            mask_rc = np.where(probs.max(0) >= threshold, values[best], 0)
            label_names = {c.key: c.label for c in self.models.catalogue}
            for k, c in enumerate(self.models.catalogue):
                classes.append({"class": c.key, "name": c.name, "label": c.label,
                                "pixels": int((mask_rc == c.label).sum()),
                                "max_probability": round(float(probs[k].max()), 4)})
        else:
            value = requests.label_value(req, prompt.cls.label if prompt.mode == "class" else 1)
            mask_rc = np.where(probs[0] >= threshold, value, 0)
            name = prompt.cls.key if prompt.mode == "class" else prompt.typed
            label_names = {name: value}
            classes.append({"class": prompt.cls.key if prompt.cls else None, "name": name, "label": value,
                            "pixels": int((mask_rc > 0).sum()), "max_probability": round(float(probs[0].max()), 4)})
        dtype = req.get("result_dtype") or ("uint8" if mask_rc.max(initial=0) <= 255 else "uint16")
        label = paste_slice(mask_rc.astype(np.uint16), image.spatial_shape, axis, index)
        write_start = time.perf_counter()
        path_out = write_label(label, image, req.get("result_extension"), dtype)
        result = {
            "label_names": label_names, "prompt": prompt.describe(), "classes": classes, "threshold": threshold,
            "mask_pixels": int((mask_rc > 0).sum()), "image_shape": list(image.spatial_shape),
            "slice": index, "axis": axis, "weights": {"path": weights_path, "source": source},
            "text_encoder": meta["text_encoder"], "device": str(device), "cache": {"image_hit": image_hit},
            "latencies": {"load_ms": round(load_ms, 1), "model_ms": round(model_ms, 1),
                          "write_ms": round((time.perf_counter() - write_start) * 1000, 1),
                          "total_ms": round((time.perf_counter() - begin) * 1000, 1)},
        }
        logger.info(f"tpdrseg {os.path.basename(path)}: {prompt.describe()['mode']} {prompt.typed!r} -> "
                    f"{result['mask_pixels']} px; {result['latencies']}")
        return path_out, result

    @staticmethod
    def _slice(req: dict, image: LoadedImage) -> Tuple[Optional[int], Optional[int]]:
        if image.is_2d:
            return None, None
        axis = requests.integer(req, "axis", 2, 0, 2)
        size = image.spatial_shape[axis]
        index = requests.optional_index(req, "slice")
        if index is None:
            index = size // 2
        if not 0 <= index < size:
            raise bad_request(f"'slice' {index} is outside the image (0..{size - 1} along axis {axis})")
        return axis, index
