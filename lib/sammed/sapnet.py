"""SAP-Net (SAM^Med; Wang et al., arXiv 2023; SAMauto's "coarse segmentation"): a spatial-aware prototypical
network on the frozen SAM image embedding, learned from the same 2-5 annotated slices as SAMassist, in seconds.

What it is (the paper's eqs. 3-7, PANet as the backbone):
- Features: F = [T(E(I)), gamma(x, y)], the frozen encoder's (256, 64, 64) embedding tuned by a small trainable
  FCN T, concatenated with fixed Fourier features of the cell's position (eq. 5-6). Slices of one volume share
  their in-plane frame, so "where the structure was on the annotated slices" is a usable cue.
- Prototypes: masked global average pooling of F over the foreground and over the background of each support slice,
  averaged over the support slices (PANet).
- Prediction: softmax over {background, foreground} of alpha * cosine similarity to each prototype. The paper writes
  exp(-alpha cos) with cos a cosine *distance*; similarity with a positive alpha is the same thing (up to a constant
  that softmax cancels), and alpha = 20 is PANet's value.
- Training: each iteration splits the annotated slices at random into a support and a query set (both non-empty).
  L_seg: the query segmented with the support's prototypes; L_align (PANet): prototypes taken from the query with
  its own (hard, detached) prediction segment the support. Each is a weighted sum of cross-entropy (PANet's loss)
  and the paper's biased Dice (eq. 7: 1 - 2TP / (2TP + beta FP + FN), beta > 1 penalises false positives more: the
  coarse mask only has to place SAM's prompts). Cross-entropy alone is the default: it measured better on our data
  (see SAPNetSettings.dice_weight); the biased Dice is one setting away.
- Inference: all annotated slices are the support (the paper); their prototypes are stored in the model (a buffer),
  so a learned SAP-Net needs no support images at inference.

Masks live on the 64x64 embedding grid of the whole-slice model frame (as SAMassist's add_slice frames a slice),
as soft area fractions: a 6-pixel-wide structure keeps its partial cells.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from lib.core.transforms.geometry import ModelFrame, Window, resize_to_model
from lib.sammed.samassist import PromptEncoderLearner


@dataclass(frozen=True)
class SAPNetSettings:
    """SAP-Net's settings; the defaults were chosen on Colin27 T1 (how, and the measurements: README, SAMauto)."""

    # -- architecture (stored with a learned SAP-Net: what rebuilds it) --
    position_encoding: bool = True  # False: PANet on SAM features
    position_dim: int = 64  # d of eq. 6 (d/2 frequencies, each giving a cos and a sin)
    position_sigma: float = 1.0  # sigma of the frequencies, coordinates in [0, 1] over the slice (flat in 0.5-4)
    # T: 1x1 conv 256 -> hidden, GroupNorm, ReLU, 3x3 conv hidden -> feature; 64 channels train in half the time
    # of 128, within seed noise of it.
    hidden_channels: int = 64
    feature_channels: int = 64
    alpha: float = 20.0  # PANet's scale of the cosine similarity
    # -- loss: ce_weight * CE + dice_weight * biased Dice (eq. 7), for L_seg and L_align alike --
    ce_weight: float = 1.0  # cross-entropy, PANet's loss
    # The paper's biased Dice is off by default: the false positives it suppresses are removed by the anchored 3D
    # components, and what remains is the false negatives it adds at the structure's ends. dice_weight=1 gives
    # the paper's SAP-Net (benchmarks/bench_samauto.py shows both).
    dice_weight: float = 0.0
    fp_weight: float = 2.0  # beta of eq. 7; 1 is the plain soft Dice
    align_weight: float = 1.0  # PANet's alignment loss weight (1 in PANet)
    # -- optimisation (Adam); 100 iterations is the knee of the 50 / 100 / 200 curve --
    iterations: int = 100
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.position_encoding and (self.position_dim <= 0 or self.position_dim % 2):
            raise ValueError("position_dim must be a positive even number (a cos and a sin per frequency)")
        if self.fp_weight <= 0:
            raise ValueError("fp_weight (beta) must be positive")
        if self.ce_weight <= 0 and self.dice_weight <= 0:
            raise ValueError("at least one of ce_weight and dice_weight must be positive")


class FourierPositionEncoding(nn.Module):
    """gamma(x, y) = [cos(2 pi B (x, y)), sin(2 pi B (x, y))] (eq. 6), B ~ N(0, sigma^2) of shape (2, dim / 2), drawn
    once from `seed` and kept as a buffer (saved with the state dict: a reloaded SAP-Net sees the same positions).
    (x, y) are the cell centres of the grid, normalised to [0, 1]; x runs along columns."""

    def __init__(self, dim: int, sigma: float = 1.0, seed: int = 0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError("dim must be a positive even number")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", sigma * torch.randn(2, dim // 2, generator=generator))

    @property
    def dim(self) -> int:
        return 2 * self.frequencies.shape[1]

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """(dim, h, w) features of an (h, w) grid."""
        h, w = size
        b = self.frequencies
        ys = (torch.arange(h, device=b.device, dtype=b.dtype) + 0.5) / h
        xs = (torch.arange(w, device=b.device, dtype=b.dtype) + 0.5) / w
        xy = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (h, w, 2)
        phase = 2 * math.pi * (xy @ b)
        return torch.cat([phase.cos(), phase.sin()], dim=-1).permute(2, 0, 1)


class SAPNet(nn.Module):
    """Features, prototypes and the prototype classifier. `prototypes` (2, D): background then foreground, set
    from all annotated slices after training; `foreground_logits` uses them unless others are given."""

    def __init__(self, settings: SAPNetSettings | None = None, in_channels: int = 256):
        super().__init__()
        s = self.settings = settings or SAPNetSettings()
        self.tuner = nn.Sequential(  # T of eq. 5
            nn.Conv2d(in_channels, s.hidden_channels, kernel_size=1),
            nn.GroupNorm(8, s.hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(s.hidden_channels, s.feature_channels, kernel_size=3, padding=1),
        )
        self.position = FourierPositionEncoding(s.position_dim, s.position_sigma, s.seed) if s.position_encoding else None
        dim = s.feature_channels + (s.position_dim if s.position_encoding else 0)
        self.register_buffer("prototypes", torch.zeros(2, dim))

    def features(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 256, h, w) frozen embedding -> (B, D, h, w) F of eq. 5."""
        tuned = self.tuner(embedding)
        if self.position is None:
            return tuned
        gamma = self.position(tuple(embedding.shape[-2:])).to(tuned.dtype)
        return torch.cat([tuned, gamma.expand(tuned.shape[0], -1, -1, -1)], dim=1)

    def class_scores(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features, (2, D) prototypes -> (B, 2, h, w) alpha * cosine similarity (softmax logits)."""
        f = F.normalize(features, dim=1)
        p = F.normalize(prototypes, dim=1)
        return self.settings.alpha * torch.einsum("bdhw,cd->bchw", f, p)

    def foreground_logits(self, embedding: torch.Tensor, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) log-odds of foreground: the 2-class softmax's foreground probability is their sigmoid."""
        scores = self.class_scores(self.features(embedding), self.prototypes if prototypes is None else prototypes)
        return scores[:, 1] - scores[:, 0]

    def predict(self, embedding: torch.Tensor, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) foreground probability on the embedding grid."""
        return torch.sigmoid(self.foreground_logits(embedding, prototypes))


def masked_prototypes(features: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor | None:
    """PANet's masked global average pooling: (B, D, h, w) features and (B, h, w) soft foreground -> (2, D)
    background and foreground prototypes, each averaged over the slices that have that class. None when no slice
    has foreground."""
    prototypes = []
    for weight in (1 - foreground, foreground):
        area = weight.flatten(1).sum(1)  # (B,)
        present = area > 0.5  # at least half a cell: a sliver is not a prototype
        if not bool(present.any()):
            return None
        pooled = torch.einsum("bdhw,bhw->bd", features, weight) / area.clamp_min(1e-6)[:, None]
        prototypes.append(pooled[present].mean(0))
    return torch.stack(prototypes)


def biased_dice_loss(probability: torch.Tensor, target: torch.Tensor, fp_weight: float = 2.0,
                     eps: float = 1.0) -> torch.Tensor:
    """Eq. 7 on soft masks: 1 - 2TP / (2TP + beta FP + FN), summed over the whole batch (slices without
    foreground then count through their FP). eps keeps an empty prediction of an empty target at loss 0."""
    tp = (probability * target).sum()
    fp = (probability * (1 - target)).sum()
    fn = ((1 - probability) * target).sum()
    return 1 - (2 * tp + eps) / (2 * tp + fp_weight * fp + fn + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, settings: SAPNetSettings) -> torch.Tensor:
    """Cross-entropy (two classes = BCE on the foreground log-odds, soft targets) plus biased Dice."""
    loss = logits.new_zeros(())
    if settings.ce_weight > 0:
        loss = loss + settings.ce_weight * F.binary_cross_entropy_with_logits(logits, target)
    if settings.dice_weight > 0:
        loss = loss + settings.dice_weight * biased_dice_loss(torch.sigmoid(logits), target, settings.fp_weight)
    return loss


def keep_largest_components(mask: np.ndarray, k: int = 1, connectivity: int = 1) -> np.ndarray:
    """The k largest connected components of a boolean mask (2D slice or 3D volume; face-connected by default,
    `connectivity` as scipy's generate_binary_structure takes it). The paper's post-processing against FPs."""
    mask = np.asarray(mask, bool)
    components, count = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, connectivity))
    if count <= k:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:k] + 1
    return np.isin(components, keep)


@dataclass
class AnnotatedSlice:
    embedding: torch.Tensor  # (1, 256, 64, 64), frozen
    foreground: torch.Tensor  # (64, 64) soft mask on the embedding grid of the model frame
    index: int | None = None


@dataclass
class LearnedSAPNet:
    state_dict: dict  # the tuner's weights, the position frequencies, the prototypes of all annotated slices
    settings: SAPNetSettings
    slices: list = field(default_factory=list)
    seconds: float = 0.0
    losses: list = field(default_factory=list)

    def info(self) -> dict:
        """JSON-able description; with the state dict it rebuilds the SAP-Net (`load_sapnet`)."""
        return {"kind": "sapnet", "settings": asdict(self.settings), "slices": list(self.slices),
                "seconds": round(self.seconds, 2), "losses": [round(float(v), 5) for v in self.losses]}


def load_sapnet(state_dict: dict, info: dict | SAPNetSettings, device: torch.device | str = "cpu") -> SAPNet:
    """A SAP-Net ready for inference from a stored state dict and its info (or settings)."""
    settings = info if isinstance(info, SAPNetSettings) else SAPNetSettings(**info["settings"])
    net = SAPNet(settings)
    net.load_state_dict(state_dict, strict=True)
    return net.to(device).eval().requires_grad_(False)


class SAPNetLearner:
    """Learns a SAP-Net on annotated slices of one volume (all in the same frame: the positions must agree)."""

    def __init__(self, model, device: torch.device, settings: SAPNetSettings | None = None):
        self.model = model
        self.device = device
        self.settings = settings or SAPNetSettings()
        self.slices: list[AnnotatedSlice] = []
        # Encodes and frames a slice exactly as SAMassist does (and the infer task's whole-slice embedding).
        self._encoder = PromptEncoderLearner(model, device)

    def add_slice(self, slice_image: torch.Tensor | None, mask: np.ndarray, index: int | None = None,
                  embedding: torch.Tensor | None = None) -> None:
        """A (C, H, W) slice in [0, 1] and its (H, W) mask (may be empty: a slice annotated as background),
        encoded once, here, unless its whole-slice `embedding` (1, 256, 64, 64) is given (e.g. the infer task's
        cached one). `index` is only recorded."""
        shape = np.shape(mask)  # the slice's; slice_image may be None when the embedding is given
        if embedding is None:
            self._encoder.add_slice(slice_image, mask)
            embedding = self._encoder.slices.pop().embedding
        frame = ModelFrame(Window.whole(shape), self.model.image_size)
        framed = resize_to_model(torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None], frame)
        foreground = F.adaptive_avg_pool2d(framed, tuple(embedding.shape[-2:]))[0]  # area fraction of each cell
        # A plain tensor that autograd may save: the infer task's cached embedding is an inference-mode tensor,
        # and a MetaTensor when the slice was one.
        embedding = embedding.detach().as_subclass(torch.Tensor).float().to(self.device).clone()
        self.slices.append(AnnotatedSlice(embedding, foreground.as_subclass(torch.Tensor).to(self.device), index))

    def train(self, progress=None) -> LearnedSAPNet:
        if not any(float(item.foreground.sum()) > 0.5 for item in self.slices):
            raise ValueError("no annotated slice with foreground to learn from")
        s = self.settings
        rng = np.random.default_rng(s.seed)
        torch.manual_seed(s.seed)
        net = SAPNet(s, in_channels=self.slices[0].embedding.shape[1]).to(self.device).train()
        embeddings = torch.cat([item.embedding for item in self.slices]).to(self.device)
        targets = torch.stack([item.foreground for item in self.slices]).to(self.device)
        optimizer = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
        losses, start = [], time.perf_counter()
        for step in range(s.iterations):
            support, query = self._split(targets, rng)
            optimizer.zero_grad()
            features = net.features(embeddings)
            loss = self._episode_loss(net, features, targets, support, query)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, s.iterations, losses[-1])
        net.eval()
        with torch.no_grad():  # at inference every annotated slice is support (the paper)
            net.prototypes.copy_(masked_prototypes(net.features(embeddings), targets))
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return LearnedSAPNet(state, s, slices=[item.index for item in self.slices],
                             seconds=time.perf_counter() - start, losses=losses)

    @staticmethod
    def _split(targets: torch.Tensor, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random support / query split (J + K = N, both non-empty), the support holding foreground. With a
        single annotated slice it is both."""
        n = len(targets)
        has_foreground = (targets.flatten(1).sum(1) > 0.5).cpu().numpy()
        if n == 1:
            return np.array([0]), np.array([0])
        while True:
            order = rng.permutation(n)
            cut = int(rng.integers(1, n))
            support, query = order[:cut], order[cut:]
            if has_foreground[support].any():
                return support, query

    @staticmethod
    def _episode_loss(net: SAPNet, features, targets, support, query) -> torch.Tensor:
        s = net.settings
        prototypes = masked_prototypes(features[support], targets[support])
        scores = net.class_scores(features[query], prototypes)
        logits = scores[:, 1] - scores[:, 0]
        loss = segmentation_loss(logits, targets[query], s)
        if s.align_weight > 0:
            # PANet's alignment: the query's own prediction (hard, no gradient through the mask) gives prototypes
            # that must segment the support back.
            predicted = (logits.detach() > 0).float()
            reverse = masked_prototypes(features[query], predicted)
            if reverse is not None:
                back = net.class_scores(features[support], reverse)
                loss = loss + s.align_weight * segmentation_loss(back[:, 1] - back[:, 0], targets[support], s)
        return loss
