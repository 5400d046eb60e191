"""SAMassist (SAM^Med; Wang et al., arXiv 2023): learn only the prompt encoder from 2-5 annotated slices, in seconds.

The image encoder and mask decoder stay frozen. Each annotated slice is encoded once; every iteration then draws
new prompts from the slice's mask (points by the uniform / centre / boundary schemes, n drawn from [1, N); boxes
jittered within [-d_in, d_out]; or both, the composite prompt) and updates the prompt encoder through the frozen
decoder with a BCE + Dice loss on the low-resolution logits. What is learned is a small state dict (the prompt
encoder's parameters) stored per label.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.core.evaluation import jitter_box
from lib.core.losses import segmentation_loss
from lib.core.training import auto_choice
from lib.core.transforms.geometry import ModelFrame, Window, crop_window, resize_to_model

SCHEMES = ("uniform", "center", "boundary")
# The paper's three prompt types, each learned on its own; "mixed" (ours) draws one of them per prompt set, with
# 0..n background points, so that one served encoder takes whatever a client sends: a click, a box, or both.
PROMPTS = ("points", "boxes", "composite", "mixed")


@dataclass(frozen=True)
class PromptLearningSettings:
    prompt: str = "points"
    scheme: str = "uniform"
    max_points: int = 6  # n foreground (and n background) points drawn from [1, max_points)
    box_jitter: tuple[float, float] = (5.0, 10.0)  # (d_in, d_out) in slice pixels
    iterations: int = 60
    # 1e-3 moved the 256-d prompt embeddings too little in 60 steps (held-out click Dice 0.07 -> 0.07); 1e-2
    # reached 0.70 on the Colin27 thalamus from 2 slices in 15 s on CPU.
    learning_rate: float = 1e-2
    prompts_per_slice: int = 2  # prompt sets drawn per slice and iteration (one decoder batch)
    seed: int = 0

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.max_points < 2:
            raise ValueError("max_points must be at least 2 (n is drawn from [1, max_points))")


def select_training_slices(label_volume: np.ndarray, axis: int, count: int, rng: np.random.Generator) -> list[int]:
    """Slices a person would annotate, as the paper simulates them: drawn from a normal distribution centred on
    the median foreground slice, its spread the standard deviation of the foreground slices; distinct."""
    foreground = np.nonzero(np.moveaxis(label_volume > 0, axis, 0).reshape(label_volume.shape[axis], -1).any(1))[0]
    if len(foreground) == 0:
        raise ValueError("the label has no foreground")
    count = min(count, len(foreground))
    centre, spread = float(np.median(foreground)), max(float(np.std(foreground)), 1.0)
    chosen: list[int] = []
    for _ in range(1000):
        index = int(round(rng.normal(centre, spread)))
        if index in foreground and index not in chosen:
            chosen.append(index)
            if len(chosen) == count:
                break
    for index in foreground[np.argsort(np.abs(foreground - centre))]:  # too few draws landed: nearest to centre
        if len(chosen) == count:
            break
        if int(index) not in chosen:
            chosen.append(int(index))
    return sorted(chosen)


def sample_points(region: np.ndarray, n: int, scheme: str, rng: np.random.Generator) -> np.ndarray:
    """n (row, col) pixels of a boolean region: uniformly, near its centre (weighted by the distance transform),
    or near its boundary (weighted by closeness to the edge)."""
    rows, cols = np.nonzero(region)
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if scheme == "uniform":
        weights = None
    else:
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1][rows, cols]
        weights = distance ** 2 if scheme == "center" else 1.0 / distance ** 2
        weights = weights / weights.sum()
    picks = rng.choice(len(rows), size=n, replace=len(rows) < n, p=weights)
    return np.stack([rows[picks], cols[picks]], axis=1).astype(np.float32)


@dataclass
class TrainingSlice:
    embedding: torch.Tensor  # (1, 256, 64, 64), frozen
    frame: ModelFrame
    mask: np.ndarray  # (H, W) bool on the slice
    target: torch.Tensor  # (1, 1, 256, 256) the mask in the decoder's low-res model frame


@dataclass
class LearnedPrompt:
    state_dict: dict
    settings: PromptLearningSettings
    slices: list = field(default_factory=list)
    seconds: float = 0.0
    losses: list = field(default_factory=list)


class PromptEncoderLearner:
    """Learns a copy of `model.prompt_encoder` on annotated slices; the model itself is left untouched (it may
    keep serving requests meanwhile)."""

    def __init__(self, model, device: torch.device, settings: PromptLearningSettings | None = None, encode=None):
        """encode: the frozen model's `encode` through a faster runtime (lib.core.runtime); None: the model's own."""
        self.model = model
        self.encode = encode if encode is not None else model.encode
        self.device = device
        self.settings = settings or PromptLearningSettings()
        self.slices: list[TrainingSlice] = []

    def add_slice(self, slice_image: torch.Tensor, mask: np.ndarray) -> None:
        """A (C, H, W) slice in [0, 1] and its (H, W) mask; encoded once, here."""
        shape = tuple(slice_image.shape[-2:])
        frame = ModelFrame(Window.whole(shape), self.model.image_size)
        x = resize_to_model(crop_window(slice_image, frame.window), frame)
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        with torch.no_grad():  # not inference_mode: the embedding takes part in autograd graphs later
            embedding = self.encode(x[None].to(self.device))
        low_res = 4 * embedding.shape[-1]  # the decoder upsamples the embedding grid twice by 2
        target = resize_to_model(torch.as_tensor(mask, dtype=torch.float32)[None], frame)
        target = F.interpolate(target[None], size=(low_res, low_res), mode="bilinear", align_corners=False)
        self.slices.append(TrainingSlice(embedding, frame, np.asarray(mask, bool), (target > 0.5).float().to(self.device)))

    def draw_prompts(self, item: TrainingSlice, rng: np.random.Generator):
        """One decoder batch of random prompts for a slice: model-frame point coords/labels and boxes."""
        s = self.settings
        coords, labels, boxes = [], [], []
        # One kind per batch: the decoder batches prompts with equal token counts (a box is two tokens).
        kind = s.prompt if s.prompt != "mixed" else PROMPTS[int(rng.integers(0, 3))]
        for _ in range(s.prompts_per_slice):
            if kind in ("points", "composite"):
                n = int(rng.integers(1, s.max_points))
                n_background = int(rng.integers(0, n + 1)) if s.prompt == "mixed" else n
                fg = sample_points(item.mask, n, s.scheme, rng)
                bg = sample_points(~item.mask, n_background, "uniform", rng)
                coords.append(item.frame.points_to_model(np.concatenate([fg, bg])))
                labels.append(np.array([1] * len(fg) + [0] * len(bg)))
            if kind in ("boxes", "composite"):
                boxes.append(item.frame.box_to_model(jitter_box(item.mask, *s.box_jitter, rng)))
        width = max((len(point_labels) for point_labels in labels), default=0)
        if labels:  # pad to one length with SAM's "not a point" label
            coords = [np.concatenate([c, np.zeros((width - len(c), 2), np.float32)]) for c in coords]
            labels = [np.concatenate([pl, -np.ones(width - len(pl), int)]) for pl in labels]
        as_tensor = lambda a, dtype: torch.as_tensor(np.stack(a), dtype=dtype, device=self.device) if a else None
        return as_tensor(coords, torch.float32), as_tensor(labels, torch.long), as_tensor(boxes, torch.float32)

    def trainable_encoder(self) -> torch.nn.Module:
        """A trainable copy of the model's prompt encoder; the decoder is frozen (its gradients flow, unstored)."""
        self.model.mask_decoder.requires_grad_(False)
        return copy.deepcopy(self.model.prompt_encoder).to(self.device).train().requires_grad_(True)

    def step(self, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer, slices: list[TrainingSlice],
             rng: np.random.Generator) -> float:
        """One optimisation step: new random prompts on every slice, loss averaged over the slices."""
        optimizer.zero_grad()
        total = 0.0
        for item in slices:
            coords, labels, boxes = self.draw_prompts(item, rng)
            logits, _ = self.model.decode(item.embedding, point_coords=coords, point_labels=labels, boxes=boxes,
                                          prompt_encoder=encoder)
            loss = segmentation_loss(logits, item.target.expand_as(logits)) / len(slices)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        return total

    def optimizer(self, encoder: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(encoder.parameters(), lr=self.settings.learning_rate)

    def train(self, progress=None) -> LearnedPrompt:
        if not self.slices:
            raise ValueError("no annotated slices to learn from")
        s = self.settings
        rng = np.random.default_rng(s.seed)
        torch.manual_seed(s.seed)
        encoder = self.trainable_encoder()
        optimizer = self.optimizer(encoder)
        losses, start = [], time.perf_counter()
        for step in range(s.iterations):
            losses.append(self.step(encoder, optimizer, self.slices, rng))
            if progress:
                progress(step + 1, s.iterations, losses[-1])
        return LearnedPrompt(state_dict_of(encoder), s, seconds=time.perf_counter() - start, losses=losses)


def state_dict_of(module: torch.nn.Module) -> dict:
    """A detached CPU copy of a module's weights, ready to save."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# What `auto` answers each kind of prompt with when the validation cannot say (no figures, or a tie): clicks the
# learned encoder (it is what makes clicks work on a box-trained model); a box, alone or with corrective clicks, the
# vanilla one (on the Colin27 putamen and thalamus it scored higher there: README, SAM^Med).
AUTO_DEFAULT = {"click": "learned", "box": "vanilla", "box_then_clicks": "vanilla"}


def samassist_auto_choice(validation: dict | None) -> dict[str, str]:
    """Per prompt kind, "learned" or "vanilla" (the baseline: what answers without the learned encoder)."""
    return auto_choice(validation, "learned", "vanilla", AUTO_DEFAULT)
