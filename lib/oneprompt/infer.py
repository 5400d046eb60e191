"""MONAI Label infer task for One-Prompt (Wu et al., CVPR 2024): prompt one slice once, then segment other slices
and images.

Modes (request parameter `mode`):
- `register`: template registration. The user prompts ONE slice of a volume (or a 2D image) with any prompt kind
  (click, bbox, doodle, seglab: see lib/oneprompt/prompts.py) and names the structure in `label` (`label_name` when
  `label` carries an uploaded label file). The slice's 256 x 256 encoder input, its encoder features (fp16), the
  prompt, the source image, axis, slice, prompt kind and modality are stored as a template of that label
  (<models>/oneprompt/templates/<label>/<n>); a label may have several (ensembling). The answer is the template's
  own prediction on its slice (template = query), a label volume with only that slice set: a preview.
- `segment`: the image segmented with a label's templates (`template`: a label name or a template id
  "<label>/<n>"; `templates`: a list of template ids or labels, to use just those). 2D images in one go: each
  template predicts the image, their probabilities are averaged (the paper's template ensembling) and thresholded
  at `threshold` (0.5). Volumes, sliced across `axis` (default: the template's), within `slices` = [start, end)
  (default: all), as `volume` says ("auto", the default: "propagate" on the volume a template was registered on,
  "gate" on other studies, the better of the two on each, README):
  - "gate": every slice predicted by the templates, then the volume gate keeps
    the unbroken run of slices around the most template-like one whose predicted region still looks like the
    template's (prototype cosine within `gate_margin`, 0.1, of the peak; `consistent_run`);
  - "propagate" (lib/oneprompt/volume.py): from a seed slice outwards, LiteMedSAM from the box of the
    previous slice's mask, until the structure ends; the seed is the template slice on the template's own volume,
    and is located on another study (One-Prompt's prediction and the template's prototype, around the template
    slice's relative position in the body);
  - "slices": every slice predicted, nothing removed: the paper's output.
  Slices that are uniform inside the image's non-zero box are skipped without running the encoder.
- `interactive`: One-Prompt's interactive mode, template = query: the prompt on the current slice, answered on that
  slice, nothing stored.
- `everything`: "segment everything": a `grid` x `grid` (default 8 x 8) lattice of positive clicks over the
  template slice's non-background region (pixels brighter than 10% of its range, within their bounding box), each
  click one template prompt predicted on the query slice (the current `slice`; the template is that same slice,
  or a stored template's image when `template` is given). Masks under `min_pixels` (model pixels) are dropped, and
  of two masks overlapping with IoU > `iou_threshold` (0.7) the one with the lower mean probability. The answer is
  one multi-label slice (labels 1..K, best first) with the map in `label_names` and `objects`.
The mode defaults to `segment` when `template`/`templates` is given, to `interactive` when the request holds a
prompt, and to `segment` with the label's templates when only a `label` that has templates is given.

Other parameters: `slice`, `axis` (0, 1 or 2; on volumes), `modality`, `ct_window` (as the other models),
`label_value` (the output value, default 1; above 255 it needs `result_dtype` uint16), `threshold`, `volume`,
`gate_margin`, `result_extension`, `result_dtype`.

Images are preprocessed as the decoder's training data were (lib/oneprompt/preprocessing.py). The encoder features of
each (image, intensity, axis, slice) are cached in an LRU: the template's slice is encoded once for registration and
previews, and a second segmentation of a volume costs only the decoder.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core.errors import RequestError, bad_request, not_found
from lib.oneprompt.model import masked_prototype
from lib.core.images import ImageCache, LoadedImage, write_label
from lib.core.transforms.geometry import paste_slice
from lib.core.cache import EmbeddingKey, LazyModel, LRUCache
from lib.core.requests import as_list, integer, label_value, number, optional_index
from lib.oneprompt.frame import SliceFrame, slice_shape, slice_window
from lib.oneprompt.preprocessing import model_input, nonzero_box, slicing_axes
from lib.core.progress import current as current_progress
from lib.oneprompt.prompts import parse_template_prompt, prompt_kind, resolve_label_tags, uploaded_label
from lib.oneprompt.templates import TemplateStore
from lib.core.device import pick_device
from lib.core.runtime import FrozenForward, resolve_runtime
from lib.core.backbone import Backbone
from lib.core.predictor import PredictorSettings, PromptPredictor
from lib.core.prompts import SlicePrompt
from lib.core.transforms.geometry import in_plane_axes
from lib.oneprompt.preprocessing import SIZE
from lib.oneprompt.volume import (Geometry, VolumeSettings, body_extent, largest_run, locate, mask_box,
                                  relative_position, trace)

logger = logging.getLogger(__name__)

MODES = ("register", "segment", "interactive", "everything")
# How `segment` treats a volume: "propagate" (lib/oneprompt/volume.py), "gate" (the model on every slice, then the
# volume gate), "slices" (the model on every slice, as the paper), or "auto" (the default): propagate on the volume
# the template was registered on, the gate on other studies, the better of the two on each (README, 2026-12-03).
VOLUME_METHODS = ("auto", "propagate", "gate", "slices")
SEED_PREFERENCE = ("seglab", "bbox", "doodle", "click")
DECODE_BATCH = 16  # "everything" prompts decoded at once (each ~2 MiB of head activations)


class OnePromptInfer(InferTask):
    def __init__(self, model_factory: Callable[[torch.device], torch.nn.Module], store: TemplateStore,
                 description: str = "One-Prompt: prompt one slice once, segment other slices and images",
                 device: str | None = None, image_loader: Callable[[str], tuple[LoadedImage, bool]] | None = None,
                 feature_cache_size: int = 32, feature_cache_bytes: int | None = None, default_modality: str | None = None, default_ct_window=None,
                 progress_every: int = 10, encoder_runtime: str = "eager", runtime_cache_dir: str | None = None,
                 backbone: Backbone | None = None, volume_settings: VolumeSettings | None = None):
        """encoder_runtime, runtime_cache_dir: where the frozen encoder's features are computed (lib.core.runtime).
        backbone: the served LiteMedSAM whose box path segments volumes (`volume` "propagate"; default: a backbone
        of its own on the bundled LiteMedSAM, the encoder One-Prompt's decoder was trained on)."""
        super().__init__(
            type=InferType.DEEPGROW,  # Slicer and OHIF show click and box tools for deepgrow-type models
            labels=[],
            dimension=3,  # `segment` answers a whole volume; the slice modes answer a volume with one slice set
            description=description,
            # `label` and `template` here put them in OHIF's Options dialog: the panel sends only clicks and these.
            config={"mode": "", "label": "", "template": "", "modality": default_modality or "", "ct_window": default_ct_window or "soft_tissue",
                    "threshold": 0.5, "grid": 8, "min_pixels": 10, "iou_threshold": 0.7, "volume": "auto",
                    "gate_margin": 0.1},
        )
        self.model_factory = model_factory
        self.store = store
        self.device = pick_device(device)
        self.features = LRUCache(feature_cache_size, feature_cache_bytes)  # ~7.3 MiB per slice in fp16
        self.boxes = LRUCache(8)
        self.image_loader = image_loader or ImageCache(4).get
        self.progress_every = progress_every
        self.lazy_model = LazyModel(model_factory, self.device, "One-Prompt model")
        self.backbone = backbone or Backbone(_bundled_litemedsam, "litemedsam", device=str(self.device),
                                             encoder_runtime=encoder_runtime, runtime_cache_dir=runtime_cache_dir)
        self._box_predictor: PromptPredictor | None = None
        self.volume_settings = volume_settings or VolumeSettings()
        self.encoder_runtime = resolve_runtime(encoder_runtime, self.device)
        self.runtime_cache_dir = runtime_cache_dir
        self._features_forward: FrozenForward | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["modes"] = list(MODES)
        info["templates"] = self.store.info()
        info["cache"] = {"features": self.features.stats()}
        info["runtime"] = (self._features_forward.info() if self._features_forward is not None
                           else {"runtime": self.encoder_runtime, "graphs": [], "eager_fallback": []})
        return info

    @property
    def model(self) -> torch.nn.Module:
        return self.lazy_model.get()

    def resolve_datastore_references(self, request: dict, datastore, allow_server_paths: bool = False) -> None:
        """Label tags ("final", ...) of the request's image in SegLab/doodle prompts become their files' paths."""
        resolve_label_tags(request, datastore, allow_server_paths)

    # -- request ---------------------------------------------------------------------------------------------
    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        req = {**self.config(), **request}
        mode = self.mode(req)
        path = req.get("image")
        if not path or not isinstance(path, str):
            raise not_found("image not found in the datastore")
        image, _ = self.image_loader(path)
        try:
            range_key, intensity = image.intensity(req.get("modality") or None, req.get("ct_window"))
        except ValueError as e:
            raise bad_request(str(e)) from e
        context = {"image": image, "range_key": range_key, "intensity": intensity, "encoder_runs": 0}
        volume, result = getattr(self, f"run_{mode}")(req, context)
        path_out = write_label(volume, image, req.get("result_extension"), req.get("result_dtype"))
        result.update({"mode": mode, "modality": range_key[0], "device": str(self.device),
                       "encoder_runs": context["encoder_runs"],
                       "latencies": {"total_ms": round((time.perf_counter() - begin) * 1000, 1)}})
        logger.info(f"One-Prompt {mode} on {path}: {({k: v for k, v in result.items() if k != 'objects'})}")
        return path_out, result

    def mode(self, req: dict) -> str:
        mode = str(req.get("mode") or "").strip().lower()
        if mode:
            if mode not in MODES:
                raise bad_request(f"'mode' must be one of {', '.join(MODES)}, got {req.get('mode')!r}")
            return mode
        if req.get("template") or req.get("templates"):
            return "segment"
        if prompt_kind(req):
            return "interactive"
        label = self.label_name(req, required=False)
        if label and self.store.metas(label):
            return "segment"
        raise bad_request("no prompt: give a prompt (clicks, 'roi', a doodle or a mask), a 'template' to segment "
                          f"with, or a 'mode' ({', '.join(MODES)})")

    @staticmethod
    def label_name(req: dict, required: bool = True) -> str | None:
        """The structure's name: `label` (Slicer's segment name), or `label_name` when `label` is an uploaded file."""
        name = req.get("label_name") or (None if uploaded_label(req) else req.get("label"))
        if required and (not name or not isinstance(name, str)):
            raise bad_request("name the structure: 'label' (or 'label_name' when a label file is uploaded)")
        return name if isinstance(name, str) and name else None

    # -- geometry and features -------------------------------------------------------------------------------
    def axis_for(self, req: dict, image: LoadedImage, default: int | None = None) -> int | None:
        """None for 2D images; else `axis`, else `default`, else the supplement's slicing axis (the coarsest;
        the last one on isotropic volumes)."""
        if image.is_2d:
            return None
        axis = optional_index(req, "axis")
        if axis is None:
            axis = default
        if axis is None:
            spacing = voxel_spacing(image)
            if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
                raise bad_request("the volume has no usable voxel spacing to choose a slicing axis: give 'axis'")
            axis = slicing_axes(spacing)[0]
        if axis not in (0, 1, 2):
            raise bad_request(f"'axis' must be 0, 1 or 2, got {axis}")
        return axis

    def frame(self, image: LoadedImage, axis: int | None) -> SliceFrame:
        box, _ = self.boxes.get_or_compute(image.fingerprint, lambda: nonzero_box(image))
        return SliceFrame(slice_window(box, axis), slice_shape(image, axis))

    def encoded(self, context: dict, axis: int | None, index: int | None, frame: SliceFrame):
        """(unit image (3, S, S), features {name: (1, C, h, w) fp16}) of a slice, or None for a uniform slice."""
        image = context["image"]
        key = ("oneprompt", image.fingerprint, context["range_key"], axis, index)

        def compute():
            unit = model_input(image, axis, index, context["intensity"], frame)
            if unit is None:
                return None
            context["encoder_runs"] += 1
            with torch.inference_mode():
                feats = self.encode_features(unit[None].to(self.device))
            return unit, {k: v.half().cpu() for k, v in feats.items()}

        value, _ = self.features.get_or_compute(key, compute)
        return value

    def encode_features(self, images: torch.Tensor) -> dict:
        """The frozen encoder's feature maps of (B, 3, S, S) model inputs, through the task's runtime."""
        if self._features_forward is None:
            self._features_forward = FrozenForward(self.model.image_encoder, self.encoder_runtime,
                                                   self.runtime_cache_dir, name="oneprompt-features")
        return self._features_forward(images)

    def model_prompt(self, prompt: dict, unit: torch.Tensor):
        """A stored or parsed prompt (model pixels) -> the model's Prompt for one template, on the device (the
        model reads the Prompt itself, not just its (p1, p2): it also draws it on the template)."""
        from lib.oneprompt.model import Prompt

        kind = prompt["kind"]
        if kind in ("click", "doodle"):
            points = torch.as_tensor(np.asarray(prompt["points"], dtype=np.float32))[None]
            labels = torch.as_tensor(np.asarray(prompt["labels"], dtype=np.int64))[None]
            p = Prompt.click(points, labels) if kind == "click" else Prompt.doodle(points, labels)
        elif kind == "bbox":
            p = Prompt.bbox(torch.as_tensor(np.asarray(prompt["box"], dtype=np.float32))[None])
        else:
            mask = torch.as_tensor(np.asarray(prompt["mask"], dtype=np.float32))[None, None]
            p = Prompt.seglab(mask, unit[None].float())
        if kind == "seglab" and self.model.prompt_encoder.seglab is None:
            raise RequestError(503, "the One-Prompt weights have no SegLab autoencoder: SegLab prompts are off")
        return _to(p, self.device)

    def probabilities(self, query: dict, template: dict, prompt) -> torch.Tensor:
        """(B, S, S) probabilities on the query for B prompts on one template (B from the prompt)."""
        batch = prompt.batch_size
        expand = lambda feats: {k: v.to(self.device).expand(batch, *v.shape[1:]) for k, v in feats.items()}
        with torch.inference_mode():
            logits = self.model(expand(query), expand(template), prompt)
        return torch.sigmoid(logits.float())[:, 0].cpu()

    # -- modes -----------------------------------------------------------------------------------------------
    def _prompted_slice(self, req: dict, context: dict):
        image = context["image"]
        axis = self.axis_for(req, image)
        frame = self.frame(image, axis)
        index, prompt = parse_template_prompt(req, image, axis, frame)
        encoded = self.encoded(context, axis, index, frame)
        if encoded is None:
            raise bad_request(f"slice {index} is uniform inside the image: nothing to prompt there")
        return axis, index, frame, prompt, encoded

    def _self_prediction(self, req: dict, context: dict, axis, index, frame, prompt, encoded):
        unit, feats = encoded
        probs = self.probabilities(feats, feats, self.model_prompt(prompt, unit))[0]
        mask = (frame.to_slice(probs) > number(req, "threshold")).numpy()
        value = label_value(req)
        volume = paste_slice(mask.astype(_label_dtype(value)) * value, context["image"].spatial_shape, axis, index)
        return volume, {"axis": axis, "slice": index, "prompt": prompt["kind"], "mask_voxels": int(mask.sum()),
                        "mean_probability": round(float(probs[probs > 0.5].mean()), 4) if (probs > 0.5).any() else 0}

    def run_register(self, req: dict, context: dict):
        label = self.label_name(req)
        axis, index, frame, prompt, encoded = self._prompted_slice(req, context)
        image = context["image"]
        meta = {"prompt_kind": prompt["kind"], "image": _image_id(image.path), "image_path": image.path,
                "axis": axis, "slice": index, "modality": context["range_key"][0],
                "ct_window": context["range_key"][1], "slice_shape": list(frame.slice_shape),
                "window_rc": list(frame.window.as_tuple()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if axis is not None:  # where the slice lies in the body: another study's seed is looked for there
            meta["relative_position"] = round(relative_position(index, body_extent(image, axis)), 4)
        template_id = self.store.add(label, encoded[0], encoded[1], prompt, meta)
        volume, info = self._self_prediction(req, context, axis, index, frame, prompt, encoded)
        count = len(self.store.metas(label))
        return volume, {"label_names": {label: label_value(req)}, "template": template_id,
                        "templates_of_label": count, **info}

    def run_interactive(self, req: dict, context: dict):
        axis, index, frame, prompt, encoded = self._prompted_slice(req, context)
        volume, info = self._self_prediction(req, context, axis, index, frame, prompt, encoded)
        return volume, {"label_names": {self.label_name(req, required=False) or "object": label_value(req)}, **info}

    def run_segment(self, req: dict, context: dict):
        names = req.get("templates") or req.get("template") or self.label_name(req, required=False)
        if isinstance(names, str) and names.strip().startswith("["):
            names = as_list(names, "templates")
        if not names:
            raise bad_request("segment needs a 'template' (a label with templates, or a template id)")
        templates = [self.store.load(i) for i in self.store.resolve(names)]
        image = context["image"]
        axis = self.axis_for(req, image, default=templates[0].meta.get("axis"))
        number(req, "gate_margin", low=0.0)  # checked whichever way the volume goes: a bad value is a 400 always
        method = str(req.get("volume") or "auto").strip().lower()
        if method not in VOLUME_METHODS:
            raise bad_request(f"'volume' must be one of {', '.join(VOLUME_METHODS)}, got {req.get('volume')!r}")
        if method == "auto" and axis is not None:
            frame = self.frame(image, axis)
            own = any(self.is_template_volume(t, image, axis, frame) for t in templates)
            method = "propagate" if own else "gate"
        if axis is not None and method == "propagate":
            return self.segment_propagated(req, context, templates, axis)
        return self.segment_every_slice(req, context, templates, axis, gate=axis is not None and method == "gate")

    def segment_every_slice(self, req: dict, context: dict, templates: list, axis, gate: bool):
        """The model on every slice (templates ensembled), then on volumes the volume gate when `gate`."""
        image = context["image"]
        frame = self.frame(image, axis)
        indices = self.slice_range(req, image, axis)
        prompts = [self.model_prompt(t.prompt, t.image) for t in templates]
        threshold, value = number(req, "threshold"), label_value(req)
        margin = number(req, "gate_margin", low=0.0)  # a cosine margin
        prototypes = self.template_prototypes(templates, prompts, threshold) if gate else None
        volume = np.zeros(image.spatial_shape, dtype=_label_dtype(value))
        masks, similarity, skipped = {}, {}, 0
        start = time.perf_counter()
        step = max(1, min(self.progress_every, len(indices) // 10 or 1))
        progress = current_progress()
        progress.begin(len(indices), "segmenting slices")
        for n, index in enumerate(indices):
            progress.step()  # may raise Cancelled, or hand the device to a waiting click
            encoded = self.encoded(context, axis, index, frame)
            progress.step()  # between the encoder and the decoder: a waiting click goes first
            if encoded is None:
                skipped += 1
            else:
                probs = torch.stack([self.probabilities(encoded[1], t.features, e)[0]
                                     for t, e in zip(templates, prompts)]).mean(0)
                mask = (frame.to_slice(probs) > threshold).numpy()
                predicted = probs > threshold
                if mask.any():
                    masks[index] = mask
                    if gate and predicted.any():
                        similarity[index] = prototype_consistency(encoded[1]["neck"], predicted, prototypes)
            if axis is not None and ((n + 1) % step == 0 or n + 1 == len(indices)):
                logger.info(f"One-Prompt segment {_image_id(image.path)} with {len(templates)} template(s): "
                            f"{n + 1}/{len(indices)} slices ({100 * (n + 1) // len(indices)}%), "
                            f"{time.perf_counter() - start:.0f}s")
            progress.done = n + 1
        kept = consistent_run(indices, similarity, margin) if gate else sorted(masks)
        for index in kept:
            paste_slice(masks[index].astype(volume.dtype) * value, image.spatial_shape, axis, index, volume)
        label = templates[0].label
        volume_info = None
        if axis is not None:
            volume_info = {"method": "gate" if gate else "slices", "predicted_slices": len(masks)}
            if gate:
                volume_info.update({"margin": margin, "removed_slices": len(masks) - len(kept),
                                    "peak_slice": max(similarity, key=similarity.get) if similarity else None,
                                    "kept_range": [kept[0], kept[-1] + 1] if kept else None})
        return volume, {"label_names": {self.label_name(req, required=False) or label: value},
                        "templates": [t.id for t in templates], "axis": axis,
                        "slices": None if axis is None else [indices[0], indices[-1] + 1],
                        "labelled_slices": len(kept), "skipped_uniform_slices": skipped, "volume": volume_info,
                        "mask_voxels": int((volume > 0).sum())}

    def segment_propagated(self, req: dict, context: dict, templates: list, axis: int):
        """The volume segmented from its seed slice outwards (lib/oneprompt/volume.py): on the template's own
        volume the seed is the template slice; on another study it is located first."""
        image = context["image"]
        frame = self.frame(image, axis)
        indices = self.slice_range(req, image, axis)
        settings = self.volume_settings
        models = TemplateSliceModels(self, context, axis, frame, templates)
        geometry = slice_geometry(image, axis)
        lo, hi = indices[0], indices[-1] + 1
        progress = current_progress()
        progress.begin(len(indices), "segmenting slices from the seed")
        visited = set()

        def visit(index: int) -> None:
            visited.add(index)
            progress.step()  # may raise Cancelled, or hand the device to a waiting click

        # the template whose own-slice mask is the most reliable seed: a mask, then a box, a doodle, a click
        ranked = sorted(range(len(templates)), key=lambda n: SEED_PREFERENCE.index(templates[n].prompt["kind"]))
        own = next((n for n in ranked if self.is_template_volume(templates[n], image, axis, frame)
                    and lo <= templates[n].meta["slice"] < hi), None)
        if own is not None:
            k0 = templates[own].meta["slice"]
            visit(k0)
            if templates[own].prompt["kind"] == "seglab":  # the mask drawn is the structure on its slice
                mask = (frame.to_slice(torch.as_tensor(models.template_masks[own], dtype=torch.float32)) > 0.5).numpy()
            else:
                mask = models.sam(k0, models.slice_box(models.template_boxes[own]))[0]
            seed = {"index": k0, "mask": mask, "source": f"the template slice ({templates[own].id})",
                    "similarity": 1.0}
        else:
            extent = body_extent(image, axis)
            position = templates[ranked[0]].meta.get("relative_position", 0.5)
            centre = extent[0] + position * (extent[1] - extent[0])
            reach = settings.search_fraction * (extent[1] - extent[0] + 1)
            stride = max(1, int(round(settings.search_step_mm / geometry.spacing_mm)))
            candidates = [k for k in indices if abs(k - centre) <= reach and (k - indices[0]) % stride == 0] or indices
            candidates.sort(key=lambda k: abs(k - centre))  # the likeliest first: progress means something
            progress.begin(len(indices) + len(candidates), "locating the structure, then segmenting")
            seed = locate(models, candidates, models.slice_box(models.template_boxes[ranked[0]]), centre, reach,
                          settings, on_slice=visit)
        anchor_box = models.slice_box(models.template_boxes[ranked[0] if own is None else own])
        masks, stopped = {}, {}
        if seed is not None:
            masks[seed["index"]] = seed["mask"]
            for direction in (1, -1):
                steps = trace(models, seed["index"], seed["mask"], direction, image.spatial_shape[axis], geometry,
                              settings, on_slice=visit, bounds=(lo, hi), anchor_box=anchor_box)
                stopped["after" if direction > 0 else "before"] = steps[-1].stop if steps else "the volume ends"
                masks.update({s.index: s.mask for s in steps if not s.stop})
            masks = largest_run(masks, seed["index"])
        value = label_value(req)
        volume = np.zeros(image.spatial_shape, dtype=_label_dtype(value))
        for index, mask in masks.items():
            paste_slice(mask.astype(volume.dtype) * value, image.spatial_shape, axis, index, volume)
        progress.done = progress.total or 0
        kept = sorted(masks)
        volume_info = {"method": "propagate", "seed_slice": seed["index"] if seed else None,
                       "seed": seed["source"] if seed else "not found",
                       "seed_similarity": round(float(seed["similarity"]), 4) if seed else None,
                       "stopped": stopped, "kept_range": [kept[0], kept[-1] + 1] if kept else None,
                       "visited_slices": len(visited | set(kept))}
        label = templates[0].label
        return volume, {"label_names": {self.label_name(req, required=False) or label: value},
                        "templates": [t.id for t in templates], "axis": axis, "slices": [lo, hi],
                        "labelled_slices": len(kept), "volume": volume_info,
                        "sam_encoder_runs": context.get("sam_encoder_runs", 0),
                        "mask_voxels": int((volume > 0).sum())}

    @staticmethod
    def is_template_volume(template, image: LoadedImage, axis: int, frame: SliceFrame) -> bool:
        """Was the template registered on this very volume, sliced the same way?"""
        meta = template.meta
        return (meta.get("image") == _image_id(image.path) and meta.get("axis") == axis
                and list(meta.get("slice_shape") or []) == list(frame.slice_shape)
                and list(meta.get("window_rc") or []) == list(frame.window.as_tuple()))

    @property
    def box_predictor(self) -> PromptPredictor:
        if self._box_predictor is None:
            self._box_predictor = self.backbone.predictor(PredictorSettings())
        return self._box_predictor

    def sam_on_slice(self, context: dict, axis: int, index: int, slice_image: torch.Tensor,
                     box_rc: tuple) -> tuple[np.ndarray, float] | None:
        """LiteMedSAM's (H, W) mask from a box on slice `index` ((C, H, W) in [0, 1]), as the `litemedsam` model
        answers a user's box (zoomed into a small structure; the embedding cached on the shared backbone), and its
        predicted IoU; None for a uniform slice."""
        image = context["image"]
        if float(slice_image.max()) == float(slice_image.min()):
            return None
        prompt = SlicePrompt(axis, index, np.zeros((0, 2)), np.zeros((0, 2)), tuple(float(v) for v in box_rc))
        key = EmbeddingKey(image.fingerprint, context["range_key"], axis, index)
        mask, info = self.box_predictor.predict(slice_image, prompt, key)
        context["sam_encoder_runs"] = context.get("sam_encoder_runs", 0) + info["encoder_runs"]
        return mask, float(info["predicted_iou"])

    def sam_on_features(self, features: dict, box: np.ndarray) -> tuple[torch.Tensor, float]:
        """(S, S) LiteMedSAM probabilities from a model-frame box on One-Prompt's stored "neck" features of a
        template slice (the same frozen encoder), and SAM's predicted IoU."""
        model = self.backbone.model
        embedding = features["neck"].to(self.device, torch.float32)
        box = np.clip(np.asarray(box, np.float32) + np.array([-1, -1, 1, 1], np.float32) *
                      PredictorSettings.box_padding, 0, SIZE - 1)
        with torch.inference_mode():
            logits, iou = model.decode(embedding, boxes=torch.as_tensor(box[None]))
        return torch.sigmoid(logits[0, 0].float()).cpu(), float(iou[0, 0])

    def template_prototypes(self, templates: list, prompts: list, threshold: float) -> torch.Tensor:
        """(T, C) unit prototypes: each template's "neck" features averaged under its own prediction on its slice
        (under the drawn prompt where that prediction is empty)."""
        out = []
        for t, prompt in zip(templates, prompts):
            weights = (self.probabilities(t.features, t.features, prompt)[0] > threshold).float()[None, None]
            if not weights.any():
                with torch.inference_mode():
                    weights = self.model.prompt_encoder.prompt_map(prompt)[:, :1].float().cpu()
            out.append(masked_prototype(t.features["neck"].float(), weights)[0])
        return torch.nn.functional.normalize(torch.stack(out), dim=1)

    @staticmethod
    def slice_range(req: dict, image: LoadedImage, axis: int | None) -> list:
        if axis is None:
            if req.get("slices") not in (None, "", []):
                raise bad_request("'slices' is for volumes; this is a 2D image")
            return [None]
        size = image.spatial_shape[axis]
        bounds = as_list(req.get("slices"), "slices")
        if not bounds:
            return list(range(size))
        if len(bounds) != 2 or not all(isinstance(v, int) for v in bounds):
            raise bad_request(f"'slices' must be [start, end) slice indices, got {bounds!r}")
        start, end = bounds
        if not 0 <= start < end <= size:
            raise bad_request(f"'slices' {bounds} must satisfy 0 <= start < end <= {size} along axis {axis}")
        return list(range(start, end))

    def run_everything(self, req: dict, context: dict):
        image = context["image"]
        template = None
        if req.get("template") or req.get("templates"):
            template = self.store.load(self.store.resolve(req.get("template") or req.get("templates"))[0])
        axis = self.axis_for(req, image, default=template.meta.get("axis") if template else None)
        frame = self.frame(image, axis)
        index = None
        if axis is not None:
            index = optional_index(req, "slice")
            index = image.spatial_shape[axis] // 2 if index is None else index
            if not 0 <= index < image.spatial_shape[axis]:
                raise bad_request(f"'slice' {index} is outside 0..{image.spatial_shape[axis] - 1} along axis {axis}")
        encoded = self.encoded(context, axis, index, frame)
        if encoded is None:
            raise bad_request(f"slice {index} is uniform inside the image: nothing to segment there")
        unit, feats = encoded
        t_unit, t_feats = (template.image, template.features) if template else (unit, feats)
        grid = integer(req, "grid", low=1, high=32)  # points per side
        points = grid_points(t_unit, grid)
        if not len(points):
            raise bad_request("the template slice has no foreground to place prompts on")
        probs = []
        progress = current_progress()
        progress.begin(len(points), "decoding grid points")
        for s in range(0, len(points), DECODE_BATCH):
            progress.advance(min(DECODE_BATCH, len(points) - s))
            chunk = torch.as_tensor(points[s:s + DECODE_BATCH])[:, None]
            probs.append(self.probabilities(feats, t_feats, self.click_prompts(chunk)))
        probs = torch.cat(probs)
        threshold = number(req, "threshold")
        kept = select_masks(probs, threshold, integer(req, "min_pixels"), number(req, "iou_threshold"))
        label = np.zeros(frame.slice_shape, dtype=np.uint8)
        objects = []
        # Paint the weakest first, so that where masks overlap the more confident one wins.
        for rank, (i, score) in reversed(list(enumerate(kept))):
            mask = (frame.to_slice(probs[i]) > threshold).numpy()
            label[mask] = rank + 1
        for rank, (i, score) in enumerate(kept):
            objects.append({"label": rank + 1, "click_xy": [round(float(v), 1) for v in points[i]],
                            "mean_probability": round(score, 4), "voxels": int((label == rank + 1).sum())})
        volume = paste_slice(label, image.spatial_shape, axis, index)
        return volume, {"label_names": {f"object_{o['label']}": o["label"] for o in objects}, "objects": objects,
                        "axis": axis, "slice": index, "prompts": len(points), "masks": len(objects),
                        "template": template.id if template else None}

    def click_prompts(self, points: torch.Tensor):
        """(B, 1, 2) positive clicks -> one batched click Prompt (B prompts), on the device."""
        from lib.oneprompt.model import Prompt

        return _to(Prompt.click(points.float(), torch.ones(points.shape[0], 1, dtype=torch.long)), self.device)


class TemplateSliceModels:
    """lib.oneprompt.volume's SliceModels for a list of templates on one image: One-Prompt on the task's cached slice
    features (the templates' probabilities averaged, their prototypes too), SAM through the served LiteMedSAM box
    path (`box_predictor`: zoomed into small structures, embeddings cached with the `litemedsam` model's)."""

    def __init__(self, task: OnePromptInfer, context: dict, axis: int, frame: SliceFrame, templates: list):
        self.task, self.context, self.axis, self.frame, self.templates = task, context, axis, frame, templates
        self._slices = LRUCache(4)  # each propagation step reads its slice for SAM and for the intensity
        self.prompts = [task.model_prompt(t.prompt, t.image) for t in templates]
        seeds = [self.template_seed(t, p) for t, p in zip(templates, self.prompts)]
        self.template_boxes = [box for box, _ in seeds]  # model frame (x0, y0, x1, y1)
        self.template_masks = [mask for _, mask in seeds]  # model frame (S, S)
        prototypes = [masked_prototype(t.features["neck"].float(), torch.as_tensor(m, dtype=torch.float32)[None, None])[0]
                      for t, m in zip(templates, self.template_masks)]
        self.prototypes = torch.nn.functional.normalize(torch.stack(prototypes), dim=1)

    def template_seed(self, template, prompt) -> tuple[np.ndarray, np.ndarray]:
        """(box, mask) of the structure on the template's own slice in its model frame (what its prototype is
        averaged under): a SegLab template's mask; else SAM (on the stored features) from the box, a click's or a
        doodle's box being that of One-Prompt's own prediction and the positive points."""
        stored = template.prompt
        if stored["kind"] == "seglab":
            mask = np.asarray(stored["mask"]) > 0
            return _model_box(mask), mask
        if stored["kind"] == "bbox":
            box = np.asarray(stored["box"], np.float32)
        else:
            own = (self.task.probabilities(template.features, template.features, prompt)[0] > 0.5).numpy()
            points = np.asarray(stored["points"], np.float32)[np.asarray(stored["labels"]) > 0]
            xs = np.concatenate([np.nonzero(own)[1], points[:, 0]])
            ys = np.concatenate([np.nonzero(own)[0], points[:, 1]])
            if not len(xs):
                raise bad_request(f"template {template.id}: its prompt has no positive point and its own slice no "
                                  "prediction: register it again with a box or a mask")
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
        probs, _ = self.task.sam_on_features(template.features, box)
        mask = probs.numpy() > 0.5
        if not mask.any():  # SAM found nothing in the box: the box itself
            x0, y0, x1, y1 = np.round(box).astype(int)
            mask[y0:y1 + 1, x0:x1 + 1] = True
        return box, mask

    def slice_box(self, box_model: np.ndarray) -> tuple:
        """A template's model-frame box at the same relative place of this image's slices."""
        return self.frame.box_to_slice(box_model)

    def features(self, index: int) -> dict | None:
        encoded = self.task.encoded(self.context, self.axis, index, self.frame)
        return None if encoded is None else encoded[1]

    def oneprompt(self, index: int) -> np.ndarray | None:
        features = self.features(index)
        if features is None:
            return None
        probs = torch.stack([self.task.probabilities(features, t.features, p)[0]
                             for t, p in zip(self.templates, self.prompts)]).mean(0)
        return self.frame.to_slice(probs).numpy()

    def slice_image(self, index: int) -> torch.Tensor:
        """(C, H, W) slice in [0, 1]."""
        image = self.context["image"]
        return self._slices.get_or_compute(
            index, lambda: image.normalised_slice(self.axis, index, self.context["intensity"]))[0]

    def sam(self, index: int, box_rc: tuple) -> tuple[np.ndarray, float] | None:
        return self.task.sam_on_slice(self.context, self.axis, index, self.slice_image(index), box_rc)

    def intensity(self, index: int) -> np.ndarray:
        return self.slice_image(index)[0].numpy()

    def similarity(self, index: int, mask: np.ndarray) -> float:
        features = self.features(index)
        if features is None:
            return -1.0
        model_mask = torch.as_tensor(self.frame.mask_to_model(mask), dtype=torch.bool)
        if not model_mask.any():
            return -1.0
        return prototype_consistency(features["neck"], model_mask, self.prototypes)


def _model_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of a non-empty model-frame mask (mask_box's corners, in the model's x, y order)."""
    r0, c0, r1, c1 = mask_box(mask)
    return np.array([c0, r0, c1, r1], np.float32)


def voxel_spacing(image: LoadedImage) -> np.ndarray:
    """(3,) mm per voxel along each axis, from the affine's columns."""
    return np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)


def slice_geometry(image: LoadedImage, axis: int) -> Geometry:
    """The physical size of a slice pixel (rows, cols) and the slice spacing (mm; 1 where the affine has none)."""
    spacing = voxel_spacing(image)
    spacing = np.where(np.isfinite(spacing) & (spacing > 0), spacing, 1.0)
    col_axis, row_axis = in_plane_axes(axis)
    return Geometry((float(spacing[row_axis]), float(spacing[col_axis])), float(spacing[axis]))


# -- segment everything: prompts and mask selection -----------------------------------------------------------------
def grid_points(unit: torch.Tensor, grid: int, level: float = 0.1) -> np.ndarray:
    """(N, 2) model (x, y) clicks: the centres of a grid x grid lattice over the bounding box of the slice's
    non-background pixels (brighter than `level` of its range), those that fall on such pixels."""
    grey = unit.float().mean(0).numpy()
    lo, hi = float(grey.min()), float(grey.max())
    foreground = grey > lo + level * (hi - lo)
    if not foreground.any():
        return np.zeros((0, 2), np.float32)
    ys, xs = np.nonzero(foreground)
    cols = xs.min() + (np.arange(grid) + 0.5) * (xs.max() - xs.min() + 1) / grid
    rows = ys.min() + (np.arange(grid) + 0.5) * (ys.max() - ys.min() + 1) / grid
    points = np.array([[x, y] for y in rows for x in cols], dtype=np.float32)
    inside = foreground[points[:, 1].astype(int), points[:, 0].astype(int)]
    return points[inside]


def select_masks(probs: torch.Tensor, threshold: float, min_pixels: int, iou_threshold: float) -> list:
    """[(index, mean probability inside the mask)] of the masks kept, best first: at least `min_pixels`, and no
    two with IoU above `iou_threshold` (of such a pair, the one with the lower mean probability goes)."""
    masks = probs > threshold
    areas = masks.flatten(1).sum(1)
    scores = [(i, float(probs[i][masks[i]].mean())) for i in range(len(probs)) if int(areas[i]) >= max(1, min_pixels)]
    scores.sort(key=lambda s: -s[1])
    kept = []
    for i, score in scores:
        overlaps = [float((masks[i] & masks[j]).sum()) / float((masks[i] | masks[j]).sum()) for j, _ in kept]
        if not overlaps or max(overlaps) <= iou_threshold:
            kept.append((i, score))
    return kept


# -- small helpers --------------------------------------------------------------------------------------------------
def prototype_consistency(query_neck: torch.Tensor, predicted: torch.Tensor, prototypes: torch.Tensor) -> float:
    """Cosine similarity between the query's "neck" features averaged under its predicted mask (S, S) and the
    templates' prototypes (T, C), averaged over the templates: is what was drawn on this slice the template's
    structure, or only something at the same place?"""
    proto = masked_prototype(query_neck.float(), predicted.float()[None, None])[0]
    return float((prototypes @ torch.nn.functional.normalize(proto, dim=0)).mean())


def consistent_run(indices: list, similarity: Dict[int, float], margin: float) -> list:
    """The volume gate: of the slices with a prediction (keys of `similarity`), keep the unbroken run of `indices`
    around the most template-like slice in which every slice's similarity is within `margin` of that peak. Why:
    trained only on queries that hold their structure (the paper's sampling), the decoder draws the template's
    structure on nearly every slice of a volume, at the prompt's place; where the structure is absent, the features
    under that drawing are those of other tissue, so their similarity to the template's prototype drops, and a
    structure is one connected run of slices."""
    if not similarity:
        return []
    peak = max(similarity, key=similarity.get)
    floor = similarity[peak] - margin
    position = {index: n for n, index in enumerate(indices)}
    kept = [peak]
    for direction in (1, -1):
        n = position[peak] + direction
        while 0 <= n < len(indices) and similarity.get(indices[n], -np.inf) >= floor:
            kept.append(indices[n])
            n += direction
    return sorted(kept)


def _bundled_litemedsam(device):
    from lib.models.sam import build_litemedsam  # on use: app start stays cheap

    return build_litemedsam(device=device)


def _to(prompt, device):
    for name in ("points", "labels", "boxes", "mask", "image"):
        value = getattr(prompt, name)
        if value is not None:
            setattr(prompt, name, value.to(device))
    return prompt


def _label_dtype(value: int):
    """The narrowest label type that holds `value` (write_label refuses a result type it does not fit)."""
    return np.uint8 if value <= np.iinfo(np.uint8).max else np.uint16


def _image_id(path: str) -> str:
    import os

    name = os.path.basename(path.rstrip("/"))
    for ext in (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name
