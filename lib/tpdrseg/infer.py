"""TP-DRSeg (issue 6) served as model `tpdrseg`: typed text -> a diabetic-retinopathy lesion mask on a fundus image.

Request parameters (POST /infer/tpdrseg?image=<id>, JSON `params`):
- `text` (or `label`, used when `text` is absent): what to segment. A class name, abbreviation or synonym of
  configs/lesions.yaml ("hard exudates", "EX", "hard exudate", "cotton wool spots", typos in long words...) is
  mapped through `LesionCatalogue.match` to its class, and the class's configured explicit description is what the
  model reads; any other text is embedded as typed ("free text"). `all` (or no text at all) answers every configured
  class at once: one multi-label result with `label_names`. An empty text, or one with no words left to embed
  (e.g. "the"), is a 400 that lists the known classes.
- `threshold` (0.5): on the per-pixel probability. With `all`, a pixel above it for several classes takes the most
  probable one.
- `label_value`: the output value of a single-class result (default: the class's label in configs/lesions.yaml,
  1 MA, 2 HE, 3 EX, 4 SE; 1 for free text).
- `slice`, `axis` (default 2): for a volume, the slice to segment (default: the middle one); the answer is a label
  volume with only that slice set. 2D images (the usual fundus photograph) are answered whole.
- `weights`: `auto` (default: the weights trained through POST /train/tpdrseg in the models folder when present,
  else the configured `tpdrseg_weights`), `trained` or `configured`.
- `result_extension`, `result_dtype`: as the other models (a 2D image's label is a PNG by default).

The result JSON says what was read: `prompt.mode` is "class" (with `matched`: the class, and `embedded`: the
description the model read), "free text" (`embedded` = the typed text) or "all"; `classes` gives each answered
class's pixels and highest probability.

Image handling: RGB photographs are read as they were in training (0-255 -> [0, 1]); a grey slice is repeated to
three channels. The image is padded to a square (bottom/right, black as a fundus surround) and area-resized to the
model's 256 px; probabilities are resized back bilinearly, so the mask has the image's own shape.

Weights are read on the first request and again whenever the file changes (a new training result is served at the
next request). A missing weights file is a 503 that says how to make one. The frozen parts (LiteMedSAM's encoder,
the text encoder) are built once and shared by every weights version.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core.errors import RequestError, bad_request, not_found
from lib.core.transforms.geometry import in_plane_axes
from lib.core.images import LoadedImage, fingerprint, load_image, write_label
from lib.core.cache import LazyModel, LRUCache
from lib.sam.interactive import pick_device

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "tpdrseg-trainable/1"
# TPDRSeg constructor options kept in a weights file's model config (the rest describe the model).
MODEL_OPTIONS = ("placement", "zoom", "num_sparse_tokens", "generator_hidden", "prior", "prior_hidden",
                 "clip_image_size")
ALL_TEXTS = {"all", "*", "every", "everything", "every lesion", "every class", "all class", "all classes"}
TRAIN_HINT = ("train them with `python -m lib.tpdrseg.training --steps 2000 --output runs/tpdrseg` (synthetic "
              "lesion data: scripts/build_fundus_data.py) and serve that folder with `--conf tpdrseg_weights "
              "runs/tpdrseg`, or train on the datastore's labelled fundus images with POST /train/tpdrseg")


# ------------------------------------------------------------------------------------------------- weights files
def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(trainable state, metadata with "model" = TPDRSeg config and "text_encoder") from
    * a .pt written by the train task (`write_weights`): {"format", "trainable_state", "model", "text_encoder", ...};
    * the folder `python -m lib.tpdrseg.training --output DIR` writes (tpdrseg.safetensors + tpdrseg.json);
    * a .safetensors or plain state-dict .pt, with the config in a .json beside it (same stem) when there is one.
    Raises FileNotFoundError when there is nothing at `path`."""
    from lib.tpdrseg.model.weights_io import read_state_dict

    if os.path.isdir(path):
        path = os.path.join(path, "tpdrseg.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    meta: Dict[str, Any] = {}
    if path.endswith(".safetensors"):
        state = read_state_dict(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "trainable_state" in obj:
            state = {k: v.float() if v.is_floating_point() else v for k, v in obj["trainable_state"].items()}
            meta = {k: v for k, v in obj.items() if k != "trainable_state"}
        else:
            state = read_state_dict(path)
    if "model" not in meta:
        sidecar = os.path.splitext(path)[0] + ".json"
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                side = json.load(f)
            meta = {**{k: v for k, v in side.items() if k != "history"}, **meta}
    return state, meta


def write_weights(path: str, model, text_encoder: str, info: Dict[str, Any],
                  dtype: Optional[torch.dtype] = None) -> None:
    """The trained tensors + model config as one .pt, and `info` (+ config) as a .json beside it; both atomically
    (the infer task may read the .pt while it is being replaced), the .pt first. `dtype` (e.g. torch.float16, half
    the file size) stores the floating-point tensors in that type; `read_weights` gives them back as float32."""
    from lib.core.stores import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in model.trainable_state().items()}
    payload = {"format": WEIGHTS_FORMAT, "trainable_state": state, "model": dict(model.config),
               "text_encoder": text_encoder}
    atomic_write(path, lambda f: torch.save(payload, f))
    meta = finite({"format": WEIGHTS_FORMAT, "model": dict(model.config), "text_encoder": text_encoder, **info})
    atomic_write(os.path.splitext(path)[0] + ".json",
                 lambda f: f.write(json.dumps(meta, indent=1, default=_json_default).encode()))


def finite(value):
    """JSON-safe copy: NaN and infinities (a metric of a class without positives) become None."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------------------------- image <-> model
def model_input(slice_image: torch.Tensor, size: int) -> Tuple[torch.Tensor, int]:
    """(C, rows, cols) in [0, 1] -> ((3, size, size), side of the padded square): grey repeated to RGB, padded
    bottom/right to a square with zeros, area-resized (bilinear when enlarging)."""
    x = slice_image.float()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = x[:3]
    rows, cols = x.shape[-2:]
    side = max(rows, cols)
    x = F.pad(x, (0, side - cols, 0, side - rows))
    mode = "area" if side >= size else "bilinear"
    x = F.interpolate(x[None], size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x[0].clamp(0, 1).contiguous(), side


def model_target(masks: np.ndarray, size: int) -> torch.Tensor:
    """(K, rows, cols) bool -> (K, size, size) float {0, 1}: padded as the image, max-pooled as
    lib/tpdrseg/training.prepare_arrays (a model pixel is lesion if any of its source pixels is)."""
    y = torch.as_tensor(np.ascontiguousarray(masks)).float()
    rows, cols = y.shape[-2:]
    side = max(rows, cols)
    y = F.pad(y, (0, side - cols, 0, side - rows))
    if side >= size:
        y = F.adaptive_max_pool2d(y[None], (size, size))[0]
    else:
        y = F.interpolate(y[None], size=(size, size), mode="nearest")[0]
    return (y > 0).float()


def probabilities_back(probs: torch.Tensor, side: int, rows: int, cols: int) -> torch.Tensor:
    """(K, S, S) probabilities -> (K, rows, cols) on the image (bilinear, padding cropped)."""
    if probs.shape[-1] != side:
        probs = F.interpolate(probs[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return probs[:, :rows, :cols]


# ----------------------------------------------------------------------------------------------------- prompts
@dataclass
class TextPrompt:
    mode: str  # "class", "free text" or "all"
    typed: str
    cls: Any = None  # LesionClass for mode "class"

    def describe(self) -> dict:
        if self.mode == "class":
            c = self.cls
            return {"mode": "class", "text": self.typed,
                    "matched": {"class": c.key, "name": c.name, "abbreviation": c.abbreviation, "label": c.label},
                    "embedded": c.prompt}
        if self.mode == "free text":
            return {"mode": "free text", "text": self.typed, "matched": None, "embedded": self.typed}
        return {"mode": "all", "text": self.typed, "matched": None}


def known_classes(catalogue) -> str:
    """"1 Microaneurysms (MA, or e.g. red dots)..." for error messages: name, abbreviation, two other synonyms."""
    from lib.tpdrseg.model.descriptions import normalise

    parts = []
    for c in catalogue:
        seen, examples = {normalise(c.name), normalise(c.abbreviation)}, []
        for s in c.synonyms:
            if normalise(s) not in seen and len(examples) < 2:
                seen.add(normalise(s))
                examples.append(s)
        also = f"; or e.g. {', '.join(examples)}" if examples else ""
        parts.append(f"{c.label} {c.name} ({c.abbreviation}{also})")
    return "; ".join(parts)


def parse_text(typed, catalogue) -> TextPrompt:
    """What a request's text asks for (see the module docstring); 400 for empty or wordless text."""
    from lib.tpdrseg.model.descriptions import normalise

    if typed is None:
        return TextPrompt("all", "all")
    if isinstance(typed, (list, tuple)) and len(typed) == 1:
        typed = typed[0]
    if not isinstance(typed, str):
        raise bad_request(f"'text' must be a string, got {type(typed).__name__}; known classes: "
                          f"{known_classes(catalogue)}, or 'all'")
    raw = " ".join(typed.split())
    if not raw:
        raise bad_request(f"empty 'text': name a lesion class or describe one. Known classes: "
                          f"{known_classes(catalogue)}; or 'all' for every class")
    words = normalise(raw, drop_filler=False)
    if raw == "*" or words in ALL_TEXTS:
        return TextPrompt("all", raw)
    found = catalogue.match(raw)
    if found is not None:
        return TextPrompt("class", raw, found)
    if not normalise(raw):  # only filler words: "all lesions", "segment the lesions", "?"
        if {"all", "every", "everything"} & set(words.split()):
            return TextPrompt("all", raw)
        raise bad_request(f"'text' {raw!r} names no lesion and has nothing to embed. Known classes: "
                          f"{known_classes(catalogue)}; or 'all' for every class")
    return TextPrompt("free text", raw)


# -------------------------------------------------------------------------------------------------- the models
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


# ------------------------------------------------------------------------------------------------- infer task
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
        self._images = LRUCache(4)
        self.image_loader = image_loader or self._load

    def _load(self, path: str) -> tuple[LoadedImage, bool]:
        key = fingerprint(path)
        self._images.discard_where(lambda k: k[0] == key[0] and k != key)
        return self._images.get_or_compute(key, lambda: load_image(key[0]))

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
        threshold = _float(req.get("threshold", 0.5), "threshold")
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
            default = prompt.cls.label if prompt.mode == "class" else 1
            value = _int(req.get("label_value", default) if req.get("label_value") not in (None, "") else default,
                         "label_value")
            if not 1 <= value <= 255 and not req.get("result_dtype"):
                raise bad_request(f"'label_value' must be between 1 and 255, got {value}")
            mask_rc = np.where(probs[0] >= threshold, value, 0)
            name = prompt.cls.key if prompt.mode == "class" else prompt.typed
            label_names = {name: value}
            classes.append({"class": prompt.cls.key if prompt.cls else None, "name": name, "label": value,
                            "pixels": int((mask_rc > 0).sum()), "max_probability": round(float(probs[0].max()), 4)})
        dtype = req.get("result_dtype") or ("uint8" if mask_rc.max(initial=0) <= 255 else "uint16")
        label = self._to_volume(mask_rc.astype(np.uint16), image, axis, index)
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
        axis = _int(req.get("axis", 2), "axis")
        if axis not in (0, 1, 2):
            raise bad_request(f"'axis' must be 0, 1 or 2, got {axis}")
        size = image.spatial_shape[axis]
        raw = req.get("slice")
        index = size // 2 if raw in (None, "") or (isinstance(raw, (int, float)) and raw < 0) else _int(raw, "slice")
        if not 0 <= index < size:
            raise bad_request(f"'slice' {index} is outside the image (0..{size - 1} along axis {axis})")
        return axis, index

    @staticmethod
    def _to_volume(mask_rc: np.ndarray, image: LoadedImage, axis, index) -> np.ndarray:
        if axis is None:
            return np.ascontiguousarray(mask_rc.T)  # (rows, cols) -> (X, Y)
        label = np.zeros(image.spatial_shape, dtype=mask_rc.dtype)
        in_plane_axes(axis)
        plane = [slice(None)] * 3
        plane[axis] = index
        label[tuple(plane)] = mask_rc.T
        return label


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise bad_request(f"'{name}' must be an integer, got {value!r}") from e


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise bad_request(f"'{name}' must be a number, got {value!r}") from e
