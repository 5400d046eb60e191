"""MONAI Label infer task for MSA adapters: one frozen backbone, one small adapter file per label.

A request names its label (Slicer's segment name, `label`); when that label has a trained adapter, the adapted
model answers (clicks and boxes go to it directly: it was trained on both), else the frozen backbone does, exactly
as the plain interactive task would. `adapter`: "auto" (the default: the adapter, unless its validation found the
frozen model better for this kind of prompt: clicks, a box, or a box with clicks), "none" (the frozen backbone even
when an adapter exists) or the name of a trained label (that adapter, always). New adapters are used at the next request.

Adapters trained with a depth branch see stacks of slices: the slices are encoded in stacks of `depth` aligned on
multiples of it (one encoder pass serves every slice of its stack), so each slice's embedding carries its
neighbours. `volume: true` with a 3D box (`roi` spanning several slices) segments the box on every slice it spans
and returns the 3D label.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core import requests
from lib.core.backbone import Backbone
from lib.core.cache import EmbeddingKey
from lib.core.errors import bad_request, not_found
from lib.models.sam.adapters import AdapterSettings, add_adapters, load_adapter_state, volumetric
from lib.core.stores import LabelStore
from lib.core.transforms.geometry import ModelFrame, Window, in_plane_axes, paste_slice, resize_to_model
from lib.core.images import write_label
from lib.core.predictor import PredictorSettings, PromptPredictor
from lib.core.prompts import SlicePrompt, parse_prompt
from lib.core.training import prompt_kind
from lib.msa.learner import msa_auto_choice

logger = logging.getLogger(__name__)

MAX_VOLUME_SLICES = 512


class AdapterInfer(InferTask):
    def __init__(self, backbone: Backbone, frozen: Callable[[dict], Tuple[str, Dict]], store: LabelStore,
                 description: str = "MSA: clicks or a box, answered by the label's trained adapter"):
        """frozen: the frozen backbone's own interactive task, which answers when a label has no adapter."""
        super().__init__(type=InferType.DEEPGROW, labels=[], dimension=2, description=description,
                         config={"adapter": "auto", "depth": "", "volume": False})
        self.backbone = backbone
        self.frozen = frozen
        self.store = store
        self.settings = PredictorSettings(zoom=False)  # adapters are trained on whole slices

    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["adapters"] = {
            label: {"label_value": meta.get("label_value"), "file_bytes": meta.get("file_bytes"),
                    "trainable_fraction": (meta.get("parameters") or {}).get("trainable_fraction"),
                    "num_slices": meta.get("num_slices"), "images": meta.get("images"),
                    "depth": (meta.get("training") or {}).get("depth", 1),
                    "validation": meta.get("validation"), "auto_choice": msa_auto_choice(meta.get("validation")),
                    "trained_at": meta.get("trained_at")}
            for label, meta in self.store.info().items()}
        return info

    def adapted_model(self, name: str):
        """(adapted model, its info, file stamp) for a trained label, else None."""
        meta = self.store.meta(name)
        if not meta:
            return None
        base = self.backbone.model

        def build(state):
            model = add_adapters(base, AdapterSettings(**meta["adapters"]))
            return load_adapter_state(model, state).eval().requires_grad_(False)

        model = self.store.load(name, "main", build, self.backbone.device)
        if model is None:
            return None
        return model, meta, self.store.stamp(name)

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        req = {**self.config(), **request}
        label = req.get("label") or None
        choice = str(req.get("adapter") or "auto")
        if choice == "none":
            path, info = self.frozen(request)
            return path, {**info, "adapter": None}
        name = label if choice == "auto" else choice
        adapted = self.adapted_model(name) if name else None
        if adapted is None:
            if choice != "auto":
                raise not_found(f"no adapter trained for label {choice!r}: train one with POST /train/ "
                                f"(trained: {sorted(self.store.info())})")
            path, info = self.frozen(request)
            return path, {**info, "adapter": None}
        if choice == "auto":
            clicks = requests.as_list(req.get("foreground"), "foreground") + requests.as_list(req.get("background"),
                                                                                           "background")
            kind = prompt_kind(bool(requests.as_list(req.get("roi"), "roi")), bool(clicks))
            if not self.adapter_validated_better(adapted[1], kind):
                path, info = self.frozen(request)
                return path, {**info, "adapter": None,
                              "adapter_skipped": f"the frozen model validated better for {name!r} on prompts of "
                                                 f"kind {kind!r}"}
        return self.run_adapted(req, name, *adapted)

    @staticmethod
    def adapter_validated_better(meta: dict, kind: str) -> bool:
        """Whether the adapter did at least as well as the frozen model (as served) in its validation (held-out
        slices, or leave-one-slice-out) for this kind of prompt (lib.core.training.PROMPT_KINDS). On the Colin27
        thalamus the frozen model's click (box search) scored 0.79 against the adapter's 0.72, while the adapter's
        box scored 0.85 against 0.56: per label and prompt kind, the better one answers."""
        return msa_auto_choice(meta.get("validation"))[kind] == "adapted"

    def run_adapted(self, req: dict, name: str, model, meta: dict, stamp) -> Tuple[str, Dict]:
        begin = time.perf_counter()
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        image, _ = self.backbone.image(path)
        prompt = parse_prompt(req, image.spatial_shape)
        try:
            range_key, intensity = image.intensity(req.get("modality") or None, req.get("ct_window"))
        except ValueError as e:
            raise bad_request(str(e)) from e
        depth = requests.integer(req, "depth", (meta.get("training") or {}).get("depth", 1), 1)
        label_value = requests.label_value(req)
        if (depth > 1 and not model.adapter_settings.depth_branch):
            raise bad_request(f"'depth' {depth}: this adapter has no depth branch (train it with depth > 1)")
        key = EmbeddingKey(image.fingerprint, range_key, prompt.axis, prompt.index, encoder=("msa", name, stamp))
        predictor = self.backbone.predictor(self.settings, model)
        if requests.flag(req, "volume"):
            indices = self.volume_slices(req, prompt, image)
            volume = np.zeros(image.spatial_shape, dtype=np.uint8)
            voxels = 0
            for n, k in enumerate(indices):
                slice_prompt = SlicePrompt(prompt.axis, k, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32),
                                           prompt.box)
                mask = self.predict(predictor, image, intensity, slice_prompt, key, depth)
                volume |= paste_slice(mask.astype(np.uint8) * label_value, image.spatial_shape, prompt.axis, k)
                voxels += int(mask.sum())
                if (n + 1) % 10 == 0 or n + 1 == len(indices):
                    logger.info(f"MSA {name!r} on {path}: {n + 1}/{len(indices)} slices")
            info = {"slices": [indices[0], indices[-1] + 1], "mask_voxels": voxels}
            label_volume = volume
        else:
            mask = self.predict(predictor, image, intensity, prompt, key, depth)
            label_volume = paste_slice(mask.astype(np.uint8) * label_value, image.spatial_shape, prompt.axis,
                                       prompt.index)
            info = {"slice": prompt.index, "mask_voxels": int(mask.sum())}
        path_out = write_label(label_volume, image, req.get("result_extension"), req.get("result_dtype"))
        result = {
            "label_names": {str(req.get("label") or name): label_value}, "axis": prompt.axis, "adapter": name,
            "depth": depth, "prompt": "box" if prompt.box is not None else "clicks", **info,
            "device": str(self.backbone.device),
            "latencies": {"total_ms": round((time.perf_counter() - begin) * 1000, 1)},
        }
        logger.info(f"MSA infer {path} with adapter {name!r}: {info}, {result['latencies']}")
        return path_out, result

    @staticmethod
    def volume_slices(req: dict, prompt: SlicePrompt, image) -> list[int]:
        roi = req.get("roi")
        if prompt.axis is None or prompt.box is None or not roi or len(roi) != 6:
            raise bad_request("'volume' needs a 3D box: 'roi' [i0, i1, j0, j1, k0, k1] on a volume")
        low, high = sorted(int(round(v)) for v in roi[2 * prompt.axis: 2 * prompt.axis + 2])
        low, high = max(low, 0), min(high, image.spatial_shape[prompt.axis] - 1)
        if high - low + 1 > MAX_VOLUME_SLICES:
            raise bad_request(f"the box spans {high - low + 1} slices; at most {MAX_VOLUME_SLICES} per request")
        return list(range(low, high + 1))

    def predict(self, predictor: PromptPredictor, image, intensity, prompt: SlicePrompt, key: EmbeddingKey,
                depth: int) -> np.ndarray:
        key = dataclasses.replace(key, index=prompt.index)
        if depth > 1:
            key = dataclasses.replace(key, encoder=key.encoder + ("depth", depth))
            self.encode_stack(predictor, image, intensity, key, depth)
        slice_image = image.normalised_slice(prompt.axis, prompt.index, intensity)
        mask, _ = predictor.predict(slice_image, prompt, key, direct=True)
        return mask

    def encode_stack(self, predictor: PromptPredictor, image, intensity, key: EmbeddingKey, depth: int) -> None:
        """Put the embeddings of the aligned stack holding `index` into the embedding cache (one encoder pass)."""
        axis, index = key.axis, key.index
        size = image.spatial_shape[axis]
        start = min((index // depth) * depth, max(size - depth, 0))
        indices = [min(start + d, size - 1) for d in range(depth)]
        col_axis, row_axis = in_plane_axes(axis)
        window = Window.whole((image.spatial_shape[row_axis], image.spatial_shape[col_axis]))
        stack_key = lambda k: dataclasses.replace(key, index=k).at(window)
        if all(stack_key(k) in predictor.embeddings for k in indices):
            return
        frame = ModelFrame(window, predictor.model.image_size)
        inputs = []
        for k in indices:
            x = resize_to_model(image.normalised_slice(axis, k, intensity), frame)
            inputs.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
        with torch.inference_mode(), volumetric(depth):
            embeddings = predictor.model.encode(torch.stack(inputs).to(predictor.device))
        for d, k in enumerate(indices):
            predictor.embeddings.get_or_compute(stack_key(k), lambda d=d: embeddings[d:d + 1].clone())
