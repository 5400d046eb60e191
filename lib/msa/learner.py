"""Training MSA adapters (Wu et al., Medical Image Analysis 2025) for one label: only the adapters (and the decoder's tail, as the paper says)
learn; the backbone stays frozen.

Prompts, per slice and step: a first prompt, a positive click anywhere in the structure (random sampling) or a
jittered box, then 0..max_clicks-1 corrective clicks, each placed, as an annotator would, in the largest error
region of the current model's prediction from the prompts so far (iterative sampling); the loss (BCE + Dice on
the low-resolution logits) is taken on the final prompt set.

Encoder work is the cost on a CPU. The frozen steps before the first adapted block run once per training slice
and their output is kept; each step then runs only the adapted part forward and back. With `depth` > 1 a training
item is a stack of consecutive slices, run through the depth branch together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.evaluation import corrective_click
from lib.models.sam.adapters import AdapterSettings, add_adapters, split_encoder, volumetric
from lib.core.transforms.geometry import ModelFrame, Window, resize_to_model
from lib.core.evaluation import jitter_box
from lib.core.losses import segmentation_loss
from lib.core.training import auto_choice


@dataclass(frozen=True)
class AdapterTrainingSettings:
    epochs: int = 20  # 10 left the putamen click at 0.69 on held-out slices, 20 reached 0.87 (8 slices)
    batch_size: int = 4  # stacks per step
    learning_rate: float = 3e-3  # adapters (zero-started, small): 1e-3 learned less in 10 epochs on the putamen
    tail_learning_rate: float = 1e-4  # the fully trained decoder tail, when trained: 3e-3 there diverged
    weight_decay: float = 0.0
    box_fraction: float = 0.5  # share of prompt sets that start from a box rather than a click
    max_clicks: int = 4  # corrective clicks added: 0 .. max_clicks - 1
    box_jitter: tuple[float, float] = (5.0, 10.0)  # (d_in, d_out) slice pixels, as SAMassist and validation use
    depth: int = 1  # slices per stack (depth branch) when the adapters have one
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.depth < 1 or self.max_clicks < 1:
            raise ValueError("epochs, batch_size, depth and max_clicks must be >= 1")
        if not 0.0 <= self.box_fraction <= 1.0:
            raise ValueError(f"box_fraction must be in [0, 1], got {self.box_fraction}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")


@dataclass
class TrainingStack:
    features: torch.Tensor  # (D, ...) frozen-part output of the stack's slices
    masks: list[np.ndarray]  # D slice masks (H, W) bool
    frames: list[ModelFrame]


class AdapterLearner:
    def __init__(self, base, device: torch.device, adapters: AdapterSettings, settings: AdapterTrainingSettings):
        self.device = torch.device(device)
        self.base = base
        # eval(): the frozen backbone's BatchNorms keep their running statistics; adapters have no dropout.
        self.model = add_adapters(base, adapters).to(self.device).eval()
        self.adapters, self.settings = adapters, settings
        if settings.depth > 1 and not adapters.depth_branch:
            raise ValueError("stacks of slices (depth > 1) need adapters with a depth branch")
        self.frozen_part, self.adapted_part = split_encoder(self.model)
        self.stacks: list[TrainingStack] = []

    def optimizer(self) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if "adapter." in n], "lr": self.settings.learning_rate},
                  {"params": [p for n, p in named if "adapter." not in n], "lr": self.settings.tail_learning_rate}]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.settings.weight_decay)

    def add_stack(self, slice_images: list[torch.Tensor], masks: list[np.ndarray]) -> None:
        """D consecutive (C, H, W) slices in [0, 1] and their (H, W) masks (D = settings.depth)."""
        if len(slice_images) != self.settings.depth or len(masks) != len(slice_images):
            raise ValueError(f"a training stack holds {self.settings.depth} slices and their masks")
        frames, inputs = [], []
        for image in slice_images:
            frame = ModelFrame(Window.whole(tuple(image.shape[-2:])), self.model.image_size)
            x = resize_to_model(image, frame)
            inputs.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
            frames.append(frame)
        with torch.inference_mode():
            features = self.frozen_part(self.model.normalize(torch.stack(inputs).to(self.device)))
        self.stacks.append(TrainingStack(features.clone(), [np.asarray(m, bool) for m in masks], frames))

    # -- prompts ---------------------------------------------------------------------------------------------
    def first_prompt(self, mask: np.ndarray, rng: np.random.Generator) -> dict:
        if rng.random() < self.settings.box_fraction:
            return {"box": jitter_box(mask, *self.settings.box_jitter, rng), "fg": [], "bg": []}
        rows, cols = np.nonzero(mask)
        k = rng.integers(len(rows))
        return {"box": None, "fg": [(float(rows[k]), float(cols[k]))], "bg": []}

    def decode(self, embedding: torch.Tensor, frame: ModelFrame, prompt: dict):
        coords = labels = boxes = None
        points = prompt["fg"] + prompt["bg"]
        if points:
            coords = torch.as_tensor(frame.points_to_model(np.asarray(points))[None], device=self.device)
            labels = torch.as_tensor([[1] * len(prompt["fg"]) + [0] * len(prompt["bg"])], device=self.device)
        if prompt["box"] is not None:
            boxes = torch.as_tensor(frame.box_to_model(prompt["box"])[None], device=self.device)
        logits, _ = self.model.decode(embedding, point_coords=coords, point_labels=labels, boxes=boxes)
        return logits[:, 0]  # (1, 4h, 4w)

    def simulate(self, embedding: torch.Tensor, mask: np.ndarray, frame: ModelFrame, rng) -> dict:
        """A first prompt, then corrective clicks in the current model's error regions (no gradient)."""
        prompt = self.first_prompt(mask, rng)
        for _ in range(int(rng.integers(self.settings.max_clicks))):
            with torch.no_grad():
                predicted = frame.mask_on_slice(self.decode(embedding, frame, prompt)[0], mask.shape)
            click = corrective_click(mask, predicted)
            if click is None:
                break
            prompt["fg" if click[1] == 1 else "bg"].append(tuple(float(v) for v in click[0]))
        return prompt

    @staticmethod
    def target(mask: np.ndarray, frame: ModelFrame, size: tuple[int, int], device) -> torch.Tensor:
        """The slice mask in the model frame at the logits' resolution, as an area fraction per pixel."""
        framed = resize_to_model(torch.as_tensor(mask, dtype=torch.float32)[None], frame)
        return F.interpolate(framed[None], size=size, mode="area")[0].to(device)

    # -- steps -----------------------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, stacks: list[TrainingStack], rng: np.random.Generator) -> float:
        depth = self.settings.depth
        features = torch.cat([s.features for s in stacks])
        with volumetric(depth):
            embeddings = self.adapted_part(features)
        logits, targets = [], []
        for i, stack in enumerate(stacks):
            for d in range(depth):
                mask, frame = stack.masks[d], stack.frames[d]
                if not mask.any():
                    continue  # a slice of the stack without the structure: nothing to prompt
                embedding = embeddings[i * depth + d: i * depth + d + 1]
                prompt = self.simulate(embedding.detach(), mask, frame, rng)
                out = self.decode(embedding, frame, prompt)
                logits.append(out)
                targets.append(self.target(mask, frame, tuple(out.shape[-2:]), self.device))
        if not logits:
            return 0.0
        loss = segmentation_loss(torch.cat(logits), torch.cat(targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def batches(self, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(len(self.stacks)).tolist()
        size = self.settings.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def train(self, progress=None) -> dict:
        """All epochs (outside MONAI Label's trainer: benchmarks and tests of the learner)."""
        rng = np.random.default_rng(self.settings.seed)
        torch.manual_seed(self.settings.seed)
        optimizer = self.optimizer()
        losses, start = [], time.perf_counter()
        for epoch in range(self.settings.epochs):
            epoch_losses = [self.step(optimizer, [self.stacks[i] for i in batch], rng) for batch in self.batches(rng)]
            losses.append(float(np.mean(epoch_losses)))
            if progress:
                progress(epoch + 1, self.settings.epochs, losses[-1])
        return {"losses": losses, "seconds": time.perf_counter() - start}


# What `auto` answers with when the validation cannot say (no figures, or a tie): the adapter, trained for this label.
AUTO_DEFAULT = {"click": "adapted", "box": "adapted", "box_then_clicks": "adapted"}


def msa_auto_choice(validation: dict | None) -> dict[str, str]:
    """Per prompt kind, "adapted" or "frozen" (the frozen model as the app serves it): whichever validated better."""
    return auto_choice(validation, "adapted", "frozen", AUTO_DEFAULT)
