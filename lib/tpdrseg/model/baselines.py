"""Vision-only baseline for TP-DRSeg (Li et al., MICCAI 2024): the paper's "Adapter" / "SAM-Adapter" rows (Tables 1-2), i.e.
parameter-efficient fine-tuning of the same frozen SAM without text or prior.

    image -> frozen SAM encoder with MSA adapters (`sam/adapters.py`, 2 per attention block) -> F_e (once per image)
                                                                                                 |
    class k -> its own learned sparse tokens (n x C_e) + SAM's no-mask dense embedding ---------+-> SAM mask decoder
                                                                                                    (one pass per class)

What makes a map class-specific is only the class's learned tokens: the encoder sees no class, so it runs once per
image for all K classes (TP-DRSeg's injected encoder runs once per (image, class)). Trained: the encoder and decoder
adapters, the class tokens and what the MSA paper trains in the decoder besides its adapters (the second two-way
block, final attention and mask head: `AdapterSettings.train_decoder_tail`, on by default here although
`add_adapters`' own default is off). Why on: TP-DRSeg trains its decoder (80% of its 4.4 M trained values), so a
baseline with a frozen decoder would differ from it in two things at once; and with the decoder frozen, the class
tokens have only the adapters to bend SAM's single-mask head, too little to fit even one exudate crop
(tests/test_tpdrseg_model.py). Pass
`settings=AdapterSettings()` for the adapters-only variant.

The interface is TPDRSeg's, so `lib/tpdrseg/training.py` trains, evaluates and saves either.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lib.models.sam.adapters import AdaptedTinyViTBlock, AdaptedViTBlock, AdapterSettings, add_adapters, encoder_steps
from lib.models.sam.sam import Sam
from lib.tpdrseg.model.model import class_logits, lesion_bce, load_trainable_parameters, soft_iou_loss

# The MSA paper's training set-up: adapters plus the decoder tail (see the module docstring).
PAPER_SETTINGS = AdapterSettings(train_decoder_tail=True)


class AdapterSAM(nn.Module):
    def __init__(self, sam: Sam, class_names: Sequence[str], num_sparse_tokens: int = 4,
                 settings: AdapterSettings | None = None, token_std: float = 0.02):
        """
        sam: the base SAM (LiteMedSAM); frozen and shared (add_adapters copies no backbone weight).
        class_names: the classes, in order: one set of learned prompt tokens each.
        num_sparse_tokens: sparse prompt tokens per class (4, as TP-DRSeg's generator makes).
        settings: MSA's options (default PAPER_SETTINGS: every attention block, decoder adapters, decoder tail).
        token_std: the tokens' initial scale; small, so the untrained decoder starts near SAM with no prompt.
        """
        super().__init__()
        settings = settings or PAPER_SETTINGS
        if settings.depth_branch:
            raise ValueError("the depth branch is for volumes; fundus images are 2D")
        if num_sparse_tokens < 1:
            raise ValueError(f"num_sparse_tokens must be >= 1, got {num_sparse_tokens}")
        self.settings = settings
        self.config = dict(baseline="adapter", class_names=list(class_names), num_sparse_tokens=num_sparse_tokens,
                           token_std=token_std, adapters=asdict(settings), image_size=sam.image_size)
        self.class_names = self.config["class_names"]
        self.image_size = sam.image_size
        self.standardize = sam.standardize
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), persistent=False)

        adapted = add_adapters(sam, settings)  # sets requires_grad: adapters (and the tail) only
        # Same attribute names as in the Sam, so that is_trainable's rules apply to this module's parameter names.
        self.image_encoder = adapted.image_encoder
        self.mask_decoder = adapted.mask_decoder
        if settings.train_decoder_tail:
            # One mask per class (multimask_output=False) and no IoU loss: the IoU head and the three multimask
            # hypernetworks would get no gradient, so they are not trained nor saved (as in TPDRSeg).
            for head in [self.mask_decoder.iou_prediction_head, *self.mask_decoder.output_hypernetworks_mlps[1:]]:
                for p in head.parameters():
                    p.requires_grad_(False)
        dim = self.mask_decoder.transformer_dim
        self.class_tokens = nn.Parameter(torch.randn(len(self.class_names), num_sparse_tokens, dim) * token_std)
        # The prompt encoder is not used beyond these two constants (no points, boxes or masks).
        self.register_buffer("no_mask_embed", sam.prompt_encoder.no_mask_embed.weight.detach().clone().reshape(-1),
                             persistent=False)
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
        self.image_encoder.eval()
        # Recompute each adapted encoder block in the backward pass instead of keeping its activations (training
        # only): less memory, about 1/3 more time. The encoder runs once per image, so this matters less than in
        # TPDRSeg, whose memory grows with images x classes.
        self.gradient_checkpointing = False

    # -- modes and parameters ----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen BatchNorm statistics (the adapters have no mode-dependent layers)
        return self

    def trainable_state(self) -> Dict[str, Tensor]:
        """The trained tensors only (adapters, class tokens, any trained decoder tail); not the frozen backbone."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: Dict[str, Tensor]) -> "AdapterSAM":
        load_trainable_parameters(self, state, "adapter baseline")
        return self

    def parameter_counts(self) -> Dict[str, int]:
        named = list(self.named_parameters())
        total = sum(p.numel() for _, p in named)
        count = lambda pred: sum(p.numel() for n, p in named if pred(n))  # noqa: E731
        return {"total": total, "trainable": sum(p.numel() for _, p in named if p.requires_grad),
                "image_encoder": count(lambda n: n.startswith("image_encoder.")),
                "encoder_adapters": count(lambda n: n.startswith("image_encoder.") and "adapter." in n),
                "decoder_adapters": count(lambda n: n.startswith("mask_decoder.") and "adapter." in n),
                "mask_decoder": count(lambda n: n.startswith("mask_decoder.")),
                "class_tokens": self.class_tokens.numel()}

    # -- forward -----------------------------------------------------------------------------------------------
    def normalize(self, images01: Tensor) -> Tensor:
        return (images01 * 255.0 - self.pixel_mean) / self.pixel_std if self.standardize else images01

    def encode(self, images01: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> the adapted encoder's embedding (B, C, h, w)."""
        steps = encoder_steps(self.image_encoder)
        adapted = [i for i, s in enumerate(steps) if isinstance(s, (AdaptedTinyViTBlock, AdaptedViTBlock))]
        first = adapted[0] if adapted else len(steps) - 1
        x = self.normalize(images01)
        with torch.no_grad():  # frozen and before any adapter: nothing to train there
            for step in steps[:first]:
                x = step(x)
        for i in range(first, len(steps)):
            if self.gradient_checkpointing and i in adapted and torch.is_grad_enabled() and self.training:
                x = checkpoint(steps[i], x, use_reentrant=False)
            else:
                x = steps[i](x)
        return x

    def forward(self, images: Tensor, classes: Tensor | Sequence[int] | None = None, text: Tensor | None = None,
                return_aux: bool = False):
        """images (B, 3, S, S) in [0, 1] -> mask logits (B, K, S, S) for `classes` ((K,) or (B, K) indices; all
        when None). With return_aux also {"iou_pred": (B, K)}."""
        if text is not None:
            raise ValueError("the adapter baseline has no text input: it segments only its trained classes "
                             "(give `classes`)")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        b = images.shape[0]
        idx = torch.arange(len(self.class_names), device=self.class_tokens.device) if classes is None else \
            torch.as_tensor(classes, device=self.class_tokens.device).long()
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(b, -1)
        if idx.dim() != 2 or idx.shape[0] != b:
            raise ValueError(f"classes {tuple(idx.shape)} do not fit {b} images: give (K,) or (B, K) indices")
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self.class_names)):
            raise ValueError(f"class indices must be in [0, {len(self.class_names)}), got {idx.tolist()}")
        k = idx.shape[1]
        embedding = self.encode(images)  # once per image, for all classes
        sparse = self.class_tokens[idx].flatten(0, 1)  # (B * K, n, C), image-major
        features = embedding.repeat_interleave(k, dim=0) if b > 1 else embedding  # a batch of 1 is shared
        dense = self.no_mask_embed[None, :, None, None].expand(b * k, -1, *embedding.shape[-2:])
        low_res, iou = self.mask_decoder(features, self.image_pe, sparse, dense, multimask_output=False)
        logits = class_logits(low_res, b, k, images.shape[-2:])
        if not return_aux:
            return logits
        return logits, {"iou_pred": iou[:, 0].reshape(b, k)}

    # -- training objective ------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor, aux: Dict[str, Tensor] | None = None,
             prior_weight: float = 0.0, fg_weight_cap: float = 0.0) -> Tuple[Tensor, Dict[str, float]]:
        """TP-DRSeg's BCE + IoU loss, averaged over the (image, class) maps, with the same lesion weighting;
        prior_weight is ignored (no prior)."""
        target = target.to(logits.dtype)
        bce = lesion_bce(logits, target, fg_weight_cap)
        iou = soft_iou_loss(logits, target)
        total = bce + iou
        return total, {"bce": float(bce.detach()), "iou": float(iou.detach()), "loss": float(total.detach())}


def build_adapter_sam(sam: Sam | None = None, catalogue=None, device: str | torch.device = "cpu",
                      **kwargs) -> AdapterSAM:
    """The adapter baseline on LiteMedSAM (default) with the configured lesion classes (configs/lesions.yaml)."""
    from lib.tpdrseg.model.descriptions import LesionCatalogue

    if sam is None:
        from lib.models.sam.build import build_litemedsam
        sam = build_litemedsam()
    catalogue = catalogue or LesionCatalogue.load()
    return AdapterSAM(sam, [c.key for c in catalogue], **kwargs).to(device)
