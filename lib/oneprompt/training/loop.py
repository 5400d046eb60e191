"""Training the decoder and prompt encoder on sampled pairs (the frozen image encoder's features come from the
cache), and the SegLab autoencoder on the training masks: loss, learning-rate schedule, settings and resumable
checkpoints."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.stores import atomic_write
from lib.oneprompt.model import OnePromptModel, SegLabAutoencoder, train_seglab
from lib.oneprompt.model.seglab import dice_loss
from lib.oneprompt.training.features import FeatureCache, stack_features
from lib.oneprompt.training.sampling import TaskSampler
from lib.oneprompt.training.samples import SampleStore
from lib.oneprompt.training.simulated_prompts import make_prompt


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps to 1, then cosine decay to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def presence_loss(logits: torch.Tensor, target: torch.Tensor, k: int = 100) -> torch.Tensor:
    """BCE of an image-level logit, the mean of the k highest pixel logits, against "the structure is on this
    query" (k = the data's smallest mask, 100 px at 256). Why: on an empty target the Dice term is saturated
    (1 - 1/(sum p + 1) has almost no gradient until sum p < 1) and the pixel-mean CE of a few hundred false pixels is
    tiny, so absent queries alone do not stop the decoder from drawing the template's structure on every slice.
    This term makes a false blob cost as much as a missed one. Our addition, off by default (the paper's loss)."""
    k = min(k, logits[0].numel())
    image_logit = torch.topk(logits.flatten(1), k, dim=1).values.mean(1)
    present = (target.flatten(1).amax(1) > 0).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(image_logit, present)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, max_weight: float = 50.0) -> torch.Tensor:
    """Class-weighted binary CE + Dice (the paper's "cross-entropy + dice"). Targets are a small part of the
    image: with plain mean CE the decoder settles on all-background early, and the Dice term, whose gradient
    vanishes as the probabilities saturate, cannot pull it out. Foreground pixels are therefore weighted by
    sqrt(background / foreground) per sample, capped at max_weight."""
    fg = target.flatten(1).mean(1).clamp(1e-4, 1.0)
    weight = torch.sqrt((1 - fg) / fg).clamp(1.0, max_weight).reshape(-1, *([1] * (target.ndim - 1)))
    ce = F.binary_cross_entropy_with_logits(logits, target, weight=1 + (weight - 1) * target)
    return ce + dice_loss(logits, target)


def trainable_state(model: OnePromptModel, dtype: Optional[torch.dtype] = None) -> dict:
    """Decoder + prompt encoder parameters and buffers: everything but the frozen image encoder. (The SegLab
    autoencoder is held outside the module tree and saved on its own; the prompt encoder's SegLab pooling layers,
    `prompt_encoder.seglab_*`, are trained here and belong in this state.)"""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("image_encoder."):
            continue
        out[k] = v.detach().to(dtype) if (dtype is not None and v.is_floating_point()) else v.detach().clone()
    return out


def atomic_save(obj, path: str) -> None:
    """torch.save, atomically (a checkpoint or weights file is either complete or absent), into a new folder if
    needed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    time_budget: Optional[float] = None  # seconds; training stops early (the schedule keeps its length)
    stop_at: Optional[int] = None  # step; training stops there (the schedule keeps its length): replays a run
    # that its time budget stopped, step for step
    levels: Sequence[str] = ("high", "medium", "low")
    presence_weight: float = 0.0  # weight of presence_loss (our addition, with absent queries; 0: the paper's loss)
    log_every: int = 20
    checkpoint_every: int = 100
    seed: int = 0


def train_decoder(model: OnePromptModel, sampler: TaskSampler, source, config: TrainConfig,
                  checkpoint: Optional[str] = None, log=print) -> dict:
    """Train the decoder and prompt encoder on sampled pairs. `source.get(sample)` -> (features, unit image,
    mask). Resumes from `checkpoint` when it exists; saves it atomically every `checkpoint_every` steps and at
    the end. Returns the history {"losses": [...], "steps_done", "seconds", ...}."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    rng = np.random.default_rng(config.seed + 1)
    history = {"losses": [], "lrs": [], "step": 0, "seconds": 0.0}
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        sampler.rng = state["sampler_rng"]
        rng = state["rng"]
        log(f"resumed from {checkpoint} at step {history['step']}")
    if hasattr(source, "rng"):
        source.rng = rng

    def save():
        if checkpoint:
            atomic_save({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "history": history, "sampler_rng": sampler.rng,
                         "rng": rng, "config": config.__dict__}, checkpoint)

    model.train()
    start = time.perf_counter()
    seconds_before = history["seconds"]
    window: List[float] = []
    while history["step"] < min(config.steps, config.stop_at or config.steps):
        if config.time_budget is not None and time.perf_counter() - start > config.time_budget:
            log(f"time budget reached at step {history['step']}")
            break
        pairs = sampler.draw_batch(config.batch_size)
        groups: Dict[str, list] = {}
        for q, t, kind in pairs:
            groups.setdefault(kind, []).append((q, t))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for kind, group in groups.items():
            q_items = [source.get(q) for q, _ in group]
            t_items = [source.get(t) for _, t in group]
            level = config.levels[int(rng.integers(len(config.levels)))]
            prompt = make_prompt(kind, [m for _, _, m in t_items], torch.stack([im for _, im, _ in t_items]),
                                 level, rng)
            logits = model(stack_features([f for f, _, _ in q_items]), stack_features([f for f, _, _ in t_items]),
                           prompt)
            target = torch.from_numpy(np.stack([m for _, _, m in q_items]).astype(np.float32))[:, None]
            loss = segmentation_loss(logits, target)
            if config.presence_weight:
                loss = loss + config.presence_weight * presence_loss(logits, target)
            loss = loss * (len(group) / len(pairs))
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history["step"] += 1
        history["losses"].append(round(total, 5))
        history["lrs"].append(optimizer.param_groups[0]["lr"])
        history["seconds"] = seconds_before + time.perf_counter() - start
        window.append(total)
        step = history["step"]
        if config.log_every and (step % config.log_every == 0 or step == config.steps):
            log(f"step {step}/{config.steps} loss {np.mean(window):.4f} lr {history['lrs'][-1]:.2e} "
                f"{history['seconds']:.0f}s ({step / max(history['seconds'], 1e-9):.2f} steps/s overall)")
            window = []
        if checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
            save()
    save()
    model.eval()
    return history


def train_seglab_on_store(store: SampleStore, cache: FeatureCache, steps: int = 300, seed: int = 0,
                          max_masks: int = 600, log_every: int = 50) -> SegLabAutoencoder:
    """The SegLab autoencoder on training-task masks (train + template splits, clean view) with their images."""
    samples = [s for s in store.samples if store.role(s.task) == "train"]
    rng = np.random.default_rng(seed)
    samples = [samples[i] for i in rng.permutation(len(samples))[:max_masks]]
    masks, images = [], []
    for s in samples:
        _, img, m = cache.item(s, 0)
        masks.append(torch.from_numpy(m.astype(np.float32)))
        images.append(img)
    return train_seglab(torch.stack(masks)[:, None], torch.stack(images), steps=steps, seed=seed,
                        straight_through=True, log_every=log_every)
