"""MONAI Label infer task for SAMauto: a whole 3D label with no prompts, for a label SAMassist training has learned.

The label's SAP-Net (learned with its prompt encoder, from the same slices) finds the structure on every slice,
its top-K 3D components are kept, and SAM draws each slice's mask from a box around it (lib/sammed/auto_segment).
It runs on the shared backbone (model, image cache). Whole-slice embeddings are kept for the request only (as
float16: a 181-slice volume holds ~360 MB while it runs) because the refinement pass needs them again.

Time is one encoder run per slice (~0.45 s on a 2-core CPU): give `slices: [start, stop]` to bound it, or run
it over the datastore with /batch/infer, which works in the background.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core import requests
from lib.core.backbone import Backbone
from lib.core.cache import EmbeddingKey
from lib.core.errors import bad_request, not_found
from lib.core.progress import current as current_progress
from lib.core.predictor import PredictorSettings
from lib.core.stores import LabelStore
from lib.sammed.sapnet import load_sapnet
from lib.core.transforms.geometry import Window, in_plane_axes
from lib.core.images import write_label
from lib.sammed.uncertainty import disagreeing_pixels, image_uncertainty, slice_disagreement
from lib.sammed.auto_segment import AutoSegmentSettings, auto_segment, stack_to_volume
from lib.sammed.learned_prompts import load_learned_encoder

logger = logging.getLogger(__name__)


class SamAutoInfer(InferTask):
    def __init__(self, backbone: Backbone, prompt_store: LabelStore,
                 settings: AutoSegmentSettings | None = None,
                 description: str = "SAMauto: the whole volume of a label learned with SAMassist, no clicks"):
        self.auto_settings = settings or AutoSegmentSettings()
        super().__init__(type=InferType.SEGMENTATION, labels=[], dimension=3, description=description,
                         config={"label": "", "label_value": 1, "top_k": self.auto_settings.top_k})
        self.backbone = backbone
        self.prompt_store = prompt_store

    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        # The labels this task can segment: those whose training also learned a SAP-Net.
        info["learned_labels"] = self.learned_labels()
        # OHIF's panel names the answer's values by these (each label comes back as `label_value`, 1 by default).
        info["labels"] = {label: 1 for label in info["learned_labels"]}
        return info

    def learned_labels(self) -> dict:
        return {label: meta["auto"] for label, meta in self.prompt_store.info().items() if meta.get("auto")}

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        req = {**self.config(), **request}
        label = str(req.get("label") or "").strip()
        if not label:
            # OHIF's Auto-Segmentation sends no label: with one label learned, that one.
            learned = sorted(self.learned_labels())
            if len(learned) != 1:
                raise bad_request("say which label to segment: 'label' (in OHIF: Options / Configurations), one of "
                                  f"{', '.join(learned)}" if learned else
                                  "say which label to segment: 'label', one trained with POST /train/")
            label = learned[0]
        meta = (self.prompt_store.meta(label) or {}).get("auto")
        model = self.backbone.model
        sapnet = self.prompt_store.load(label, "sapnet", lambda state: load_sapnet(state, meta, self.backbone.device),
                                        self.backbone.device) if meta else None
        if sapnet is None:
            raise not_found(f"nothing learned for label {label!r} to segment automatically: train it first "
                            f"(POST /train/ with this label)")
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        image, _ = self.backbone.image(path)
        if image.is_2d:
            raise bad_request("SAMauto segments volumes; this image is 2D")
        try:
            label_value = requests.label_value(req)
            top_k = requests.integer(req, "top_k", self.auto_settings.top_k, 1)
            range_key, intensity = image.intensity(req.get("modality") or None, req.get("ct_window") or None)
            settings = AutoSegmentSettings(**{**self.auto_settings.__dict__, "top_k": top_k})
        except (TypeError, ValueError) as e:
            raise bad_request(str(e)) from e
        axis = int(meta["axis"])
        num_slices = image.spatial_shape[axis]
        start, stop = self.slice_range(req.get("slices"), num_slices)
        col_axis, row_axis = in_plane_axes(axis)
        shape = (image.spatial_shape[row_axis], image.spatial_shape[col_axis])

        predictor = self.backbone.predictor(PredictorSettings(zoom=False))
        kept: dict[int, torch.Tensor] = {}

        def embed(k: int) -> torch.Tensor:
            if k not in kept:
                slice_image = image.normalised_slice(axis, k, intensity)
                key = EmbeddingKey(image.fingerprint, range_key, axis, k)
                kept[k] = predictor.embed(slice_image, Window.whole(shape), key)[0].half()
            return kept[k].float()

        watched = current_progress()
        watched.begin(num_slices, "coarse pass and refinement over slices")

        def progress(done: int, total: int) -> None:
            watched.total = total
            watched.advance(done - watched.done)  # may raise Cancelled, or hand the device to a waiting click
            if done == total or done % 20 == 0:
                logger.info(f"SAMauto {label!r} on {path}: {done}/{total} slices")

        learned_encoder = load_learned_encoder(self.prompt_store, label, model.prompt_encoder)
        # Points go to the label's learned prompt encoder (vanilla LiteMedSAM ignores them); a box to the vanilla one.
        encoder = learned_encoder if "points" in settings.refine else None
        annotated = self.annotated(label, path, shape, (start, stop))
        result = auto_segment(model, sapnet, embed, num_slices, shape, prompt_encoder=encoder, settings=settings,
                              slice_range=(start, stop), annotated=annotated, progress=progress)
        volume = stack_to_volume(result.labels, axis).astype(np.uint8) * label_value
        disagreement = slice_disagreement(result.coarse, result.labels, annotated)
        disputed = disagreeing_pixels(result.coarse, result.labels, annotated)
        path_out = write_label(volume, image, req.get("result_extension"), req.get("result_dtype"))
        info = {
            "label_names": {label: label_value}, "axis": axis, "slices": [start, stop],
            "segmented_slices": int((result.labels.reshape(num_slices, -1).any(1)).sum()),
            "annotated_slices_kept": sorted(annotated),
            "voxels": int((volume > 0).sum()), "seconds": result.seconds,
            # What active learning ranks images and slices by (lib/sammed/uncertainty.py).
            "uncertainty": {"image": image_uncertainty(disagreement),
                            "slices": {str(k): v for k, v in disputed.items()}},
            "latencies": {"total_ms": round((time.perf_counter() - begin) * 1000, 1)},
        }
        logger.info(f"SAMauto {label!r} on {path}: {info}")
        return path_out, info

    def annotated(self, label: str, path: str, shape: tuple[int, int],
                  slice_range: tuple[int, int]) -> dict[int, np.ndarray]:
        """The label's training masks on this image (matched by file name, in the slab): SAMauto returns them
        unchanged and keeps the 3D components that hold them. Empty for any other image."""
        stored = self.prompt_store.load(label, "annotated", lambda state: state, "cpu") or {}
        masks = {}
        for index, mask in stored.get(os.path.basename(path), {}).items():
            index = int(index)
            if slice_range[0] <= index < slice_range[1] and tuple(mask.shape) == shape:
                masks[index] = mask.numpy().astype(bool)
        if stored and not masks:
            logger.info(f"SAMauto {label!r}: no training slice on {os.path.basename(path)}; components by size")
        return masks

    @staticmethod
    def slice_range(value, num_slices: int) -> tuple[int, int]:
        if value in (None, "", []):
            return 0, num_slices
        try:
            start, stop = (int(v) for v in value)
        except (TypeError, ValueError) as e:
            raise bad_request(f"'slices' must be [start, stop], got {value!r}") from e
        if not 0 <= start < stop <= num_slices:
            raise bad_request(f"'slices' must satisfy 0 <= start < stop <= {num_slices}, got {value!r}")
        return start, stop
