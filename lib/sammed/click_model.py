"""The click model: a LiteMedSAM prompt encoder learned once, on clicks, over many structures, for every label.

LiteMedSAM was fine-tuned on boxes only, so a click means little to it. SAMassist (SAM^Med) learns the prompt
encoder for one structure from 2-5 of its slices; here the same learning runs once over many labelled structures,
so that a label nobody has taught yet gets clicks that work. The image encoder and mask decoder stay frozen (their
embeddings are computed once per slice); only the prompt encoder's few thousand parameters are learned, and the
file ships with the app.

Each training prompt set is an annotator's session, as the CVPR 2025 interactive challenge simulates one: a first
prompt (a click drawn towards the target's interior with SAMassist's centre scheme, or a jittered box), then 0..N
corrective clicks, each in the largest error region of the current model's own mask (foreground for missed tissue,
background for extra), every click kept. The loss (BCE + Dice) is taken on the mask after the last click, so the
encoder learns what a first click means and what a correction means.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lib.core.evaluation import corrective_click
from lib.core.losses import segmentation_loss
from lib.core.settings import REPO_ROOT, resolve_path
from lib.core.transforms.geometry import ModelFrame, Window, crop_window, resize_to_model
from lib.sammed.samassist import sample_points, state_dict_of

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "click_prompt_encoder.pt")


@dataclass(frozen=True)
class ClickTrainingSettings:
    steps: int = 500
    slices_per_step: int = 2
    targets_per_slice: int = 6  # sessions per slice and step (one decoder batch)
    box_fraction: float = 0.25  # sessions that start with a box rather than a click
    max_corrections: int = 4  # corrective clicks after the first prompt: 0..max_corrections
    box_jitter: tuple[float, float] = (2.0, 6.0)  # (inwards, outwards) model-frame pixels per side
    box_padding: float = 6.0  # as the predictor pads a served box (PredictorSettings.box_padding)
    learning_rate: float = 5e-3
    seed: int = 0


@dataclass
class ClickSlice:
    embedding: torch.Tensor  # (1, C, h, w), frozen
    targets: np.ndarray  # (T, s, s) bool: each target's mask in the model frame at the decoder's output size
    scale: float  # model-input pixels per output pixel (1 for LiteMedSAM, 4 for Meta SAM)


class ClickModelLearner:
    """Learns a copy of `model.prompt_encoder` from simulated annotator sessions on many labelled slices."""

    def __init__(self, model, device: torch.device, settings: ClickTrainingSettings | None = None, encode=None):
        self.model = model
        self.encode = encode if encode is not None else model.encode
        self.device = device
        self.settings = settings or ClickTrainingSettings()
        self.slices: list[ClickSlice] = []

    def add_slice(self, slice_image: torch.Tensor, masks: list[np.ndarray]) -> None:
        """A (C, H, W) slice in [0, 1] and its targets' (H, W) masks; encoded once, here."""
        if not masks:
            return
        frame = ModelFrame(Window.whole(tuple(slice_image.shape[-2:])), self.model.image_size)
        x = resize_to_model(crop_window(slice_image, frame.window), frame)
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        with torch.no_grad():
            embedding = self.encode(x[None].to(self.device)).float()
        low_res = 4 * embedding.shape[-1]  # the decoder upsamples the embedding grid twice by 2
        stacked = resize_to_model(torch.as_tensor(np.stack(masks), dtype=torch.float32), frame)
        stacked = torch.nn.functional.interpolate(stacked[None], size=(low_res, low_res), mode="bilinear")[0]
        in_frame = stacked.numpy() > 0.5
        keep = in_frame.reshape(len(masks), -1).sum(1) >= 4
        if keep.any():
            self.slices.append(ClickSlice(embedding, in_frame[keep], self.model.image_size / low_res))

    # -- sessions --------------------------------------------------------------------------------------------
    def first_prompts(self, targets: np.ndarray, rng: np.random.Generator):
        """(points as lists of (row, col, label), boxes or None) for each target's first prompt, in output
        pixels."""
        s = self.settings
        points = [[] for _ in targets]
        if rng.random() < s.box_fraction:
            boxes = []
            for mask in targets:
                rows, cols = np.nonzero(mask)
                o = rng.uniform(-s.box_jitter[0], s.box_jitter[1], size=4) + s.box_padding
                boxes.append([cols.min() - o[1], rows.min() - o[0], cols.max() + o[3], rows.max() + o[2]])
            return points, np.asarray(boxes, np.float32).clip(0, targets.shape[-1] - 1)
        for n, mask in enumerate(targets):
            r, c = sample_points(mask, 1, "center", rng)[0]
            points[n].append((r, c, 1))
        return points, None

    def _tensors(self, points, scale: float):
        width = max(len(p) for p in points)
        coords = np.zeros((len(points), width, 2), np.float32)
        labels = -np.ones((len(points), width), np.int64)  # SAM's "not a point" pads the shorter sessions
        for n, session in enumerate(points):
            for m, (r, c, label) in enumerate(session):
                coords[n, m] = (c * scale, r * scale)  # the model takes (x, y) in its input frame
                labels[n, m] = label
        return (torch.as_tensor(coords, device=self.device), torch.as_tensor(labels, device=self.device))

    def session_prompts(self, item: ClickSlice, encoder, rng: np.random.Generator):
        """A batch of sessions on one slice: first prompts, then corrective clicks from the encoder's own masks."""
        s = self.settings
        pick = rng.choice(len(item.targets), size=min(s.targets_per_slice, len(item.targets)), replace=False)
        targets = item.targets[pick]
        points, boxes = self.first_prompts(targets, rng)
        box_tensor = torch.as_tensor(boxes * item.scale, device=self.device) if boxes is not None else None
        for _ in range(int(rng.integers(0, s.max_corrections + 1))):
            coords, labels = self._tensors(points, item.scale) if any(points) else (None, None)
            with torch.no_grad():
                logits, _ = self.model.decode(item.embedding, point_coords=coords, point_labels=labels,
                                              boxes=box_tensor, prompt_encoder=encoder)
            predicted = (logits[:, 0] > 0).cpu().numpy()
            for n, mask in enumerate(targets):
                click = corrective_click(mask, predicted[n])
                if click is not None:
                    points[n].append((click[0][0], click[0][1], click[1]))
        coords, labels = self._tensors(points, item.scale) if any(points) else (None, None)
        return targets, coords, labels, box_tensor

    # -- training --------------------------------------------------------------------------------------------
    def trainable_encoder(self) -> torch.nn.Module:
        self.model.requires_grad_(False)
        return copy.deepcopy(self.model.prompt_encoder).to(self.device).train().requires_grad_(True)

    def train(self, progress=None) -> dict:
        if not self.slices:
            raise ValueError("no labelled slices to learn from")
        s = self.settings
        rng = np.random.default_rng(s.seed)
        torch.manual_seed(s.seed)
        encoder = self.trainable_encoder()
        optimizer = torch.optim.Adam(encoder.parameters(), lr=s.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.steps)
        losses, start = [], time.perf_counter()
        for step in range(s.steps):
            optimizer.zero_grad()
            total = 0.0
            for index in rng.choice(len(self.slices), size=min(s.slices_per_step, len(self.slices)), replace=False):
                item = self.slices[index]
                targets, coords, labels, boxes = self.session_prompts(item, encoder, rng)
                logits, _ = self.model.decode(item.embedding, point_coords=coords, point_labels=labels, boxes=boxes,
                                              prompt_encoder=encoder)
                target = torch.as_tensor(targets[:, None], dtype=torch.float32, device=self.device)
                loss = segmentation_loss(logits, target) / s.slices_per_step
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            schedule.step()
            losses.append(total)
            if progress:
                progress(step + 1, s.steps, total)
        return {"prompt_encoder": state_dict_of(encoder), "settings": asdict(s), "losses": losses,
                "seconds": round(time.perf_counter() - start, 1), "slices": len(self.slices),
                "targets": int(sum(len(item.targets) for item in self.slices))}


def served_image_kinds(state: dict) -> tuple[str, ...]:
    """The kinds of image ("MR/3D": modality/dimensions) whose clicks the click model answers (the others keep
    the box search): those where benchmarks/bench_interactive.py measured it better, as its training command
    recorded them."""
    return tuple(state.get("image_kinds") or ())


def read_click_model(path: str) -> dict | None:
    """The click model's file (weights, image kinds, what it learned from), or None when it is missing."""
    if not path or not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def click_model_encoder(template: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A copy of `template` (the model's prompt encoder) with the click model's weights."""
    encoder = copy.deepcopy(template)
    encoder.load_state_dict(state["prompt_encoder"], strict=True)
    return encoder.to(next(template.parameters()).device).eval().requires_grad_(False)


def load_click_model(template: torch.nn.Module, path: str = WEIGHTS):
    """The shipped click model as a copy of `template`; None when the file is missing (clicks then fall back to
    the box search)."""
    state = read_click_model(path)
    return click_model_encoder(template, state) if state is not None else None


def click_model_path_for(model_name: str | None, settings: dict) -> str | None:
    """The click model's weights for a served model, as the app decides them (lib/configs/backbones.py,
    ServedModels.click_model_path): LiteMedSAM with its default weights only (no `litemedsam_checkpoint`; the
    click model was learned on them); `click_model_weights` names another file, or `none`."""
    if model_name != "litemedsam" or settings.get("litemedsam_checkpoint"):
        return None
    configured = str(settings.get("click_model_weights") or "")
    if configured.lower() == "none":
        return None
    return resolve_path(configured, REPO_ROOT) if configured else WEIGHTS
