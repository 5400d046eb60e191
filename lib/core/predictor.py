"""From a prompt on one slice to a mask: embedding cache, AutoZoom crop, and click handling for box-trained models.

Two facts shape this module (both measured on our sample data, see README):
- Small targets vanish at 256x256: a 12-pixel structure on a 512-pixel CT slice is 6 pixels at the model's input.
  As nnInteractive's AutoZoom does, when the prompt covers a small part of the slice we crop a window around it
  with a margin, encode the window, and map the mask back.
- LiteMedSAM was fine-tuned with boxes only and ignores clicks. A click is therefore turned into a box: square
  candidate boxes of several sizes centred on the clicks are decoded in one batch on the cached whole-slice
  embedding, and the candidate the model itself scores best (predicted IoU) among those that contain every
  foreground click and no background click wins. The chosen box is remembered for the object (keyed by its first
  click), so the next clicks on it refine that box with one decoder run instead of a new search. Background
  clicks cut the mask's components they fall in. Clicks use the whole slice, not a zoom window: their target's
  size is unknown until the search has run, and zooming afterwards scored lower on our data.
- MedSAM was trained with boxes jittered outwards; a tight box reads as "smaller than the object". Boxes are
  padded by `box_padding` pixels of the model frame (+0.04 mean Dice on our sample targets, see README).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from lib.core.transforms.geometry import ModelFrame, Window, crop_window, resize_to_model
from lib.core.cache import EmbeddingKey, LRUCache
from lib.core.prompts import SlicePrompt

# Window sides (pixels) a zoom crop is rounded up to, so that nearby prompts reuse one cached embedding.
_WINDOW_LADDER = tuple(int(32 * 2 ** (i / 2)) for i in range(16))  # 32, 45, 64, 90, 128, ... ~5800


@dataclass(frozen=True)
class PredictorSettings:
    zoom: bool = True
    # Zoom only when the window needed is smaller than this fraction of the slice's longer side.
    zoom_threshold: float = 0.6
    # The zoom window is the target's extent times this factor (context on every side).
    zoom_context: float = 2.5
    # Pixels of the model's input frame added on each side of a box.
    box_padding: float = 6.0
    # Candidate box sides for a click, as fractions of the slice's longer side.
    click_box_fractions: tuple[float, ...] = (0.04, 0.08, 0.16, 0.32, 0.6)


def quantised_window(box_rc, slice_shape, context: float) -> Window:
    """A square window around a (row0, col0, row1, col1) box, its side rounded up to the ladder and its centre
    snapped to an eighth of that side: small changes of the prompt map to the same window (and embedding)."""
    r0, c0, r1, c1 = box_rc
    extent = max(r1 - r0 + 1, c1 - c0 + 1) * context
    side = next((s for s in _WINDOW_LADDER if s >= extent), _WINDOW_LADDER[-1])
    step = max(1, side // 8)
    centre_r = round(((r0 + r1) / 2) / step) * step
    centre_c = round(((c0 + c1) / 2) / step) * step
    return Window(int(centre_r - side // 2), int(centre_c - side // 2), side, side)


class ObjectMemory:
    """The box chosen for each clicked object (key: slice + first foreground click), least recent dropped."""

    def __init__(self, max_items: int = 256):
        self.max_items = max_items
        self._boxes: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._boxes.get(key)

    def put(self, key, box) -> None:
        with self._lock:
            self._boxes[key] = box
            self._boxes.move_to_end(key)
            while len(self._boxes) > self.max_items:
                self._boxes.popitem(last=False)

    def discard_where(self, predicate) -> None:
        with self._lock:
            for key in [k for k in self._boxes if predicate(k)]:
                del self._boxes[key]


class PromptPredictor:
    """Runs a composed SAM (`lib.models.sam.Sam`) on prompts, one slice at a time, with cached embeddings."""

    def __init__(self, model, device: torch.device, embeddings: LRUCache, objects: "ObjectMemory",
                 settings: PredictorSettings | None = None, encode=None):
        """encode: the model's `encode` through a faster runtime (Backbone.encode); None: the model's own."""
        self.model = model
        self.encode = encode if encode is not None else model.encode
        self.device = device
        self.embeddings = embeddings
        self.objects = objects
        self.settings = settings or PredictorSettings()

    # -- embeddings ------------------------------------------------------------------------------------------
    def embed(self, slice_image: torch.Tensor, window: Window, cache_key: EmbeddingKey):
        """The image embedding of `window` of a (C, H, W) slice in [0, 1]; cached under cache_key at window."""
        frame = ModelFrame(window, self.model.image_size)

        def encode():
            x = resize_to_model(crop_window(slice_image, window), frame)
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            with torch.inference_mode():
                return self.encode(x[None].to(self.device))

        embedding, hit = self.embeddings.get_or_compute(cache_key.at(window), encode)
        return embedding, frame, hit

    def model_box(self, frame: ModelFrame, box_rc) -> np.ndarray:
        """A slice box in the model frame, padded by `box_padding` on every side."""
        return frame.box_to_model(box_rc) + np.array([-1, -1, 1, 1], dtype=np.float32) * self.settings.box_padding

    def decode_boxes(self, embedding, frame: ModelFrame, boxes_rc: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Window logits (B, h, w) and predicted IoU (B,) for a batch of slice boxes."""
        boxes = torch.as_tensor(np.stack([self.model_box(frame, b) for b in boxes_rc]), device=self.device)
        with torch.inference_mode():
            logits, iou = self.model.decode(embedding, boxes=boxes)  # one embedding, shared by all the boxes
        return frame.logits_to_window(logits[:, 0]), iou[:, 0]

    # -- prompts -> mask -------------------------------------------------------------------------------------
    def predict(self, slice_image: torch.Tensor, prompt: SlicePrompt, cache_key: EmbeddingKey,
                prompt_encoder=None, direct: bool = False) -> tuple[np.ndarray, dict]:
        """Mask (H, W) bool for the prompt on a (C, H, W) slice in [0, 1], plus what was done and how long.
        prompt_encoder: a learned one (SAMassist) that understands this label's clicks: they then go to the
        model as points, with no box search. direct: the same for a model that understands clicks itself (one
        trained with them, e.g. with MSA adapters)."""
        shape = tuple(slice_image.shape[-2:])
        info = {"encoder_runs": 0}
        t0 = time.perf_counter()
        if prompt_encoder is not None or direct:
            box, logits, iou, window = self._predict_learned(slice_image, prompt, cache_key, info, prompt_encoder)
        elif prompt.box is not None:
            box, logits, iou, window = self._predict_box(slice_image, prompt.box, cache_key, info)
        else:
            box, logits, iou, window = self._predict_clicks(slice_image, prompt, cache_key, info)
        frame = ModelFrame(window, self.model.image_size)
        mask = self._respect_clicks(frame.paste(logits > 0, shape, fill=False).cpu().numpy(), prompt)
        info.update(box_rc=[round(float(v), 1) for v in box], window=list(window.as_tuple()),
                    zoomed=window != Window.whole(shape), predicted_iou=round(float(iou), 4),
                    model_ms=round(1000 * (time.perf_counter() - t0), 1))
        return mask, info

    def _embed_counted(self, slice_image, window: Window, cache_key: EmbeddingKey, info: dict):
        embedding, frame, hit = self.embed(slice_image, window, cache_key)
        info["encoder_runs"] += 0 if hit else 1
        return embedding, frame

    def _window_for(self, box, shape) -> Window:
        if self.settings.zoom:
            zoomed = quantised_window(box, shape, self.settings.zoom_context)
            if zoomed.height < self.settings.zoom_threshold * max(shape):
                return zoomed
        return Window.whole(shape)

    def _predict_learned(self, slice_image, prompt: SlicePrompt, cache_key: EmbeddingKey, info: dict, prompt_encoder):
        """Points (and a box, if any) straight to the model, through a learned prompt encoder if given."""
        shape = tuple(slice_image.shape[-2:])
        window = self._window_for(prompt.box, shape) if prompt.box is not None else Window.whole(shape)
        embedding, frame = self._embed_counted(slice_image, window, cache_key, info)
        coords = labels = boxes = None
        if len(prompt.foreground) or len(prompt.background):
            points = np.concatenate([prompt.foreground, prompt.background]).reshape(-1, 2)
            coords = torch.as_tensor(frame.points_to_model(points)[None], device=self.device)
            labels = torch.as_tensor([[1] * len(prompt.foreground) + [0] * len(prompt.background)], device=self.device)
        if prompt.box is not None:
            boxes = torch.as_tensor(self.model_box(frame, prompt.box)[None], device=self.device)
        with torch.inference_mode():
            logits, iou = self.model.decode(embedding, point_coords=coords, point_labels=labels, boxes=boxes,
                                            prompt_encoder=prompt_encoder)
        window_logits = frame.logits_to_window(logits[:, 0])
        fg = prompt.foreground
        box = prompt.box if prompt.box is not None else (*fg.min(axis=0), *fg.max(axis=0))
        info["learned_prompt"] = True
        return box, window_logits[0], iou[0, 0], window

    def _predict_box(self, slice_image, box, cache_key: EmbeddingKey, info: dict):
        shape = tuple(slice_image.shape[-2:])
        window = self._window_for(box, shape)
        embedding, frame = self._embed_counted(slice_image, window, cache_key, info)
        logits, iou = self.decode_boxes(embedding, frame, [box])
        return box, logits[0], iou[0], window

    def _predict_clicks(self, slice_image, prompt: SlicePrompt, cache_key: EmbeddingKey, info: dict):
        """Clicks -> the box a box-trained model should get, on the cached whole-slice embedding."""
        shape = tuple(slice_image.shape[-2:])
        window = Window.whole(shape)
        embedding, frame = self._embed_counted(slice_image, window, cache_key, info)
        fg, bg = prompt.foreground, prompt.background
        (rmin, cmin), (rmax, cmax) = fg.min(axis=0), fg.max(axis=0)
        object_key = (cache_key, tuple(np.round(fg[0]).astype(int).tolist()))  # the object: its first click
        remembered = self.objects.get(object_key)
        if remembered is not None:
            # A refinement click on a known object: grow its box to take in new foreground clicks.
            r0, c0, r1, c1 = remembered
            box = (min(r0, rmin), min(c0, cmin), max(r1, rmax), max(c1, cmax))
            logits, iou = self.decode_boxes(embedding, frame, [box])
            info["object_memory"] = True
            self.objects.put(object_key, box)
            return box, logits[0], iou[0], window

        centre_r, centre_c = (rmin + rmax) / 2, (cmin + cmax) / 2
        candidates = []
        for fraction in self.settings.click_box_fractions:
            half = max(2.0, fraction * max(shape) / 2)
            r0, r1 = min(rmin, centre_r - half), max(rmax, centre_r + half)
            c0, c1 = min(cmin, centre_c - half), max(cmax, centre_c + half)
            candidates.append((max(r0, 0.0), max(c0, 0.0), min(r1, shape[0] - 1.0), min(c1, shape[1] - 1.0)))
        logits, iou = self.decode_boxes(embedding, frame, candidates)
        masks = (logits > 0).cpu().numpy()
        scores = iou.float().cpu().numpy().copy()
        for n, mask in enumerate(masks):
            inside = lambda pts: [bool(mask[int(round(r)), int(round(c))]) for r, c in pts]
            if not all(inside(fg)) or any(inside(bg)) or not mask.any():
                scores[n] -= 1.0  # invalid: keep only as a last resort
        best = int(np.argmax(scores))
        info["click_candidates"] = [round(float(s), 3) for s in scores]
        info["object_memory"] = False
        self.objects.put(object_key, candidates[best])
        return candidates[best], logits[best], iou[best], window

    @staticmethod
    def _respect_clicks(mask: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
        """The user's clicks are ground truth, applied to the model's mask as an annotator means them.

        Anchors say "the object is here": the foreground clicks and, with a box, the box's centre. When some
        component holds an anchor, only anchored components are kept (a blob elsewhere is not the object); else,
        without a box, the components a background click falls in are dropped. A background click in a kept
        component (put to cut a leak; with a box and no anchored component, in any component) removes the pixels
        nearer to it than to any anchor. With a box, only within twice the click's depth in the mask: the leak it
        sits in, not everything past the half-way line to the box's centre, which took true tissue with it (box +
        1 corrective click fell from 0.837 to 0.808 mean Dice on the held-out targets of
        benchmarks/bench_interactive.py; capped, it rises to 0.848). Without a box the cut is not capped: a first
        click's mask can be a whole organ, and the cut must reach across it."""
        if not mask.any() or (not len(prompt.foreground) and not len(prompt.background)):
            return mask
        anchors = prompt.foreground.reshape(-1, 2)
        if prompt.box is not None:
            r0, c0, r1, c1 = prompt.box
            anchors = np.concatenate([anchors, np.array([[(r0 + r1) / 2, (c0 + c1) / 2]], np.float32)])
        components, _ = ndimage.label(mask)
        at = lambda pts: {int(components[int(round(r)), int(round(c))]) for r, c in pts} - {0}
        anchored, cut = at(anchors), at(prompt.background)
        if not anchored and prompt.box is None:
            return mask & ~np.isin(components, sorted(cut))
        out = np.isin(components, sorted(anchored)) if anchored else mask.copy()
        clicks = prompt.background.reshape(-1, 2)
        reach = np.full(len(clicks), np.inf, np.float32)
        if prompt.box is not None and len(clicks):
            depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            reach = np.array([max(3.0, 2.0 * depth[int(round(r)), int(round(c))]) for r, c in clicks], np.float32)
        for cid in (cut & anchored) if anchored else cut:
            rows, cols = np.nonzero(components == cid)
            pixels = np.stack([rows, cols], axis=1).astype(np.float32)
            to_clicks = np.linalg.norm(pixels[:, None, :] - clicks[None, :, :], axis=2)
            nearest = np.argmin(to_clicks, axis=1)
            to_click = to_clicks[np.arange(len(pixels)), nearest]
            to_anchor = np.min(np.linalg.norm(pixels[:, None, :] - anchors[None, :, :], axis=2), axis=1)
            removed = (to_click < to_anchor) & (to_click <= reach[nearest])
            out[rows[removed], cols[removed]] = False
        return out
