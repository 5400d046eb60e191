"""TP-DRSeg weights files: what the train task and scripts/export_tpdrseg_weights.py write, and what the server reads.

Only the trained tensors are stored (`TPDRSeg.trainable_state`: injectors, prompt generator, decoder, learned prior):
the frozen LiteMedSAM and text encoder are rebuilt from their own weights, so a file is a few MB and is served on
whichever copy of the frozen parts the app already holds. The model config (injector placement, prior mode, class
text, ...) travels with the tensors: `TPDRSegModels.load` rebuilds the same model from it before loading them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

WEIGHTS_FORMAT = "tpdrseg-trainable/1"


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
