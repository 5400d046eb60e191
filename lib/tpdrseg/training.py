"""Training and evaluation of TP-DRSeg (Li et al., MICCAI 2024) on the synthetic fundus-lesion data
(data/fundus_lesions).

Data: `prepare_arrays` (lib/tpdrseg/preprocessing.py, the geometry the server uses too) takes the 512 px images and
4-class masks to the model's 256 px: images area-averaged, masks max-pooled so that no microaneurysm is lost.

Training (`train`): AdamW (lr 1e-4, the paper's), BCE + IoU loss (+ an optional auxiliary loss on the learned
prior, `TPDRSeg.loss`), random left/right and up/down flips (left/right = the other eye; the synthetic backgrounds
are already rotated, zoomed and re-coloured per image). Per step each image is trained for `classes_per_image`
classes drawn at random (1 by default: the injected encoder runs once per (image, class), so K = 4 would cost 4x).
Nothing can be cached: the injectors change every encoder block after the first, so the frozen encoder's outputs are
recomputed each step; only the part before the first injector and the prior's frozen pass run without autograd.

Metrics (`lesion_metrics`, the paper's): per class, Dice at 0.5 and AUC-ROC and AUC-PR of the per-pixel
probabilities, each with all test pixels pooled (dataset-level, as DR lesion benchmarks on IDRiD/DDR report them);
mDice / mAUC are the means over classes that have positive pixels. AUC-PR is average precision (the step-wise area
under the precision-recall curve, sklearn's `average_precision_score`); both AUCs are computed here with numpy
(sklearn agrees: tests/test_tpdrseg_model.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from lib.core.requests import parse_flag
from lib.tpdrseg.dataset import CLASSES, REPO_ROOT, ensure_dataset, load_dataset
from lib.tpdrseg.preprocessing import prepare_arrays

logger = logging.getLogger(__name__)
DEFAULT_DATA = REPO_ROOT / "data" / "fundus_lesions"


# ----------------------------------------------------------------------------------------------------------- data
def flip_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
    """Random left/right and up/down flips, the same for an image and its masks."""
    images, masks = images.clone(), masks.clone()
    for i in range(images.shape[0]):
        dims = [d for d, p in ((-1, 0.5), (-2, 0.5)) if torch.rand((), generator=generator) < p]
        if dims:
            images[i] = images[i].flip(dims)
            masks[i] = masks[i].flip(dims)
    return images, masks


# -------------------------------------------------------------------------------------------------------- metrics
def _binary_curves(scores: np.ndarray, labels: np.ndarray):
    """Cumulative (tp, fp) at each distinct score threshold, highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of tied scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp, fp


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; ties handled as sklearn's roc_auc_score). nan without both classes."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    tp, fp = _binary_curves(scores, labels)
    tpr, fpr = np.r_[0, tp] / pos, np.r_[0, fp] / neg
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC-PR as average precision: sum over thresholds of (recall step) x precision (sklearn's definition)."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    pos = labels.sum()
    if pos == 0:
        return float("nan")
    tp, fp = _binary_curves(scores, labels)
    precision, recall = tp / (tp + fp), tp / pos
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = np.asarray(pred) > 0, np.asarray(target) > 0
    denom = pred.sum() + target.sum()
    return float(2.0 * (pred & target).sum() / denom) if denom else float("nan")


def lesion_metrics(probs: np.ndarray, masks: np.ndarray, class_names: Sequence[str] = CLASSES,
                   threshold: float = 0.5, valid: Optional[np.ndarray] = None) -> Dict:
    """probs, masks (N, K, H, W) -> {class: {dice, auc_roc, auc_pr, positives}, mDice, mAUC_ROC, mAUC_PR}.

    All pixels of all images pooled per class; `valid` (N, H, W) restricts to e.g. the field of view. Classes
    without positive pixels get nan and are left out of the means."""
    probs, masks = np.asarray(probs, np.float32), np.asarray(masks) > 0
    out: Dict = {}
    for k, name in enumerate(class_names):
        p, m = probs[:, k], masks[:, k]
        if valid is not None:
            p, m = p[valid], m[valid]
        positives = int(m.sum())
        out[name] = {"dice": dice(p >= threshold, m) if positives else float("nan"),
                     "auc_roc": roc_auc(p, m), "auc_pr": average_precision(p, m), "positives": positives}
    for key, metric in (("mDice", "dice"), ("mAUC_ROC", "auc_roc"), ("mAUC_PR", "auc_pr")):
        values = [out[n][metric] for n in class_names if not np.isnan(out[n][metric])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


# ------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    data_dir: str = str(DEFAULT_DATA)
    steps: int = 200
    batch_size: int = 2
    classes_per_image: int = 1  # text prompts trained per image and step (the encoder runs once per pair)
    lr: float = 1e-4  # the paper's AdamW learning rate
    weight_decay: float = 0.01
    prior_loss_weight: float = 0.5  # auxiliary loss on the learned prior (0: the paper's loss alone)
    fg_weight_cap: float = 50.0  # lesion pixels weighted sqrt(bg/fg) in the BCE, capped (0: the paper's plain BCE)
    command: Optional[str] = None  # the command line that ran this training (recorded with the weights)
    flips: bool = True
    seed: int = 0
    eval_every: int = 0  # steps between test-split evaluations (0: only at the end when evaluate=True)
    evaluate: bool = True
    eval_batch: int = 1
    log_every: int = 10
    output: Optional[str] = None  # directory for weights (trainable tensors) + config + metrics
    gradient_checkpointing: bool = False  # recompute encoder activations in backward (less memory, ~1/3 slower)


def sample_classes(batch: int, num_classes: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """(B, per_image) distinct class indices per image, uniformly at random."""
    return torch.stack([torch.randperm(num_classes, generator=generator)[:per_image] for _ in range(batch)])


def train_step(model, optimizer, images: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor,
               prior_loss_weight: float = 0.0, fg_weight_cap: float = 0.0) -> Dict[str, float]:
    """One AdamW step on images (B, 3, S, S), masks (B, K_all, S, S), classes (B, k) -> loss parts and seconds."""
    start = time.perf_counter()
    model.train()
    logits, aux = model(images, classes=classes, return_aux=True)
    target = torch.gather(masks, 1, classes[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    loss, parts = model.loss(logits, target, aux, prior_loss_weight, fg_weight_cap)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    parts["seconds"] = time.perf_counter() - start
    return parts


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int = 1) -> np.ndarray:
    """Probabilities (N, K, S, S) for every configured class."""
    model.eval()
    return np.concatenate([torch.sigmoid(model(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def evaluate(model, images: torch.Tensor, masks: torch.Tensor, batch: int = 1) -> Dict:
    return lesion_metrics(predict(model, images, batch), masks.numpy(), model.class_names)


def make_optimizer(model, config: TrainConfig):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                             weight_decay=config.weight_decay)


def train(model, config: TrainConfig = TrainConfig()) -> Dict:
    """Train `model` (a TPDRSeg or the AdapterSAM baseline) on the synthetic data's train split; returns the history (and test metrics)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if Path(config.data_dir) == DEFAULT_DATA:
        ensure_dataset(DEFAULT_DATA)
    images, masks, manifest = load_dataset(config.data_dir, "train")
    x_train, y_train = prepare_arrays(images, masks, model.image_size)
    test = None
    if config.evaluate or config.eval_every:
        ti, tm, _ = load_dataset(config.data_dir, "test")
        test = prepare_arrays(ti, tm, model.image_size)
    optimizer = make_optimizer(model, config)
    model.gradient_checkpointing = config.gradient_checkpointing
    history, n = {"steps": [], "evaluations": [], "config": asdict(config), "notice": manifest["notice"],
                  "command": config.command}, len(x_train)
    for step in range(1, config.steps + 1):
        idx = torch.randint(n, (config.batch_size,), generator=gen)
        xb, yb = x_train[idx], y_train[idx]
        if config.flips:
            xb, yb = flip_batch(xb, yb, gen)
        classes = sample_classes(len(idx), yb.shape[1], config.classes_per_image, gen)
        parts = train_step(model, optimizer, xb, yb, classes, config.prior_loss_weight, config.fg_weight_cap)
        history["steps"].append({"step": step, **parts})
        if config.log_every and step % config.log_every == 0:
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
        if test is not None and config.eval_every and step % config.eval_every == 0:
            history["evaluations"].append({"step": step, **evaluate(model, *test, config.eval_batch)})
            logger.info(f"step {step} test: " + ", ".join(f"{k} {history['evaluations'][-1][k]:.4f}"
                                                         for k in ("mDice", "mAUC_ROC", "mAUC_PR")))
    if test is not None and config.evaluate:
        history["final"] = evaluate(model, *test, config.eval_batch)
    if config.output:
        save_trained(model, config.output, history)
    return history


def save_trained(model, out_dir: str, history: Optional[Dict] = None) -> Path:
    """<out_dir>/tpdrseg.safetensors (the trainable tensors only) + tpdrseg.json (model config, history)."""
    from lib.tpdrseg.model.weights_io import write_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(model.trainable_state(), out / "tpdrseg.safetensors")
    with open(out / "tpdrseg.json", "w") as f:
        json.dump({"model": model.config, "history": history or {}}, f, indent=1, default=float)
    return out / "tpdrseg.safetensors"


def load_trained(model, out_dir: str):
    from lib.tpdrseg.model.weights_io import read_safetensors

    return model.load_trainable_state(read_safetensors(Path(out_dir) / "tpdrseg.safetensors"))


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """`python -m lib.tpdrseg.training --steps 200 --output runs/tpdrseg`: LiteMedSAM + MiniLM (offline defaults);
    `--model adapter`: the vision-only MSA adapter baseline (`lib/tpdrseg/model/baselines.py`) on the same data."""
    import argparse

    from lib.tpdrseg.model.baselines import build_adapter_sam
    from lib.tpdrseg.model.model import build_tpdrseg

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field, value in asdict(TrainConfig()).items():
        if field == "command":
            continue  # recorded, not chosen
        kind = type(value) if value is not None else str
        if kind is bool:
            parser.add_argument(f"--{field.replace('_', '-')}", type=parse_flag, default=value)
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--model", default="tpdrseg", choices=("tpdrseg", "adapter"),
                        help="TP-DRSeg (the method) or the vision-only MSA adapter baseline (no text, no prior)")
    # Text options: TP-DRSeg only (None: not given, so that giving one to the adapter baseline is an error).
    parser.add_argument("--text-encoder", default=None, help="tpdrseg only (default minilm)")
    parser.add_argument("--clip-weights", default=None, help="tpdrseg only")
    parser.add_argument("--class-text", default=None, choices=("description", "name"),
                        help="tpdrseg only: embed each class's explicit description (the method, default) or its "
                             "bare name (the ablation)")
    parser.add_argument("--threads", type=int, default=0)
    args = vars(parser.parse_args(argv))
    threads = args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    kind = args.pop("model")
    text_options = {k: args.pop(k) for k in ("text_encoder", "clip_weights", "class_text")}
    if kind == "adapter":
        given = [f"--{k.replace('_', '-')}" for k, v in text_options.items() if v is not None]
        if given:
            parser.error(f"{', '.join(given)}: only for --model tpdrseg (the adapter baseline has no text input)")
        model = build_adapter_sam()
    else:
        model = build_tpdrseg(text_encoder=text_options["text_encoder"] or "minilm",
                              clip_weights=text_options["clip_weights"],
                              class_text=text_options["class_text"] or "description")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = " ".join(["python -m lib.tpdrseg.training", *(argv if argv is not None else sys.argv[1:])])
    history = train(model, TrainConfig(**args, command=command))
    if "final" in history:
        logger.info(json.dumps({k: history["final"][k] for k in ("mDice", "mAUC_ROC", "mAUC_PR")}))
    return history


if __name__ == "__main__":
    main()
