"""TP-DRSeg (Li et al., MICCAI 2024): text-prompted DR lesion segmentation with a frozen SAM.

    image -> frozen SAM encoder blocks, each followed by a prior-aligned injector -> F_e --+
      |                                                                                 +-> prompt generator
      +-> explicit prior encoder (visual tower . class text) -> P_e (B, K, h, w) -------+   -> SAM mask decoder
                                                                                            (one pass per class)

Trained: the injectors, the prompt generator, the mask decoder (initialised from the SAM's own) and, in the offline
"learned" prior mode, the visual projection that stands in for CLIP's image tower (`prior_encoder.py`). Frozen:
the SAM image encoder (weights and BatchNorm statistics; kept in eval mode), CLIP and the text encoder (text enters
as fixed embeddings).

Where the injectors sit (`placement`):
* "blocks" (default): after every attention block of TinyViT's stages 1-3 (2 + 6 + 2 = 10 with LiteMedSAM; every
  block for a ViT). The paper puts one "in each encoder layer" of ViT-B, i.e. after every transformer block; TinyViT's
  attention blocks are its transformer blocks, and they are also where the MSA adapter baseline (`sam/adapters.py`)
  sits, so the two parameter-efficient methods are compared at the same places. The convolutional stage 0 (MBConv at
  full 256x256 resolution, 64 channels) gets none: it is low-level, the most expensive place to attend
  (4096 tokens after the stride-4 zoom), and leaving it alone lets it run once per image for all K classes.
* "stages": after the last block of each attention stage (3), for a cheaper model.

The prior map P_e is computed once per image and class at the frozen SAM embedding grid (64x64 for LiteMedSAM) in the
learned mode, at CLIP's patch grid in the CLIP mode; injectors and generator resize it bilinearly to their grid.

Cost: the injected encoder runs once per (image, class): a class's prior changes every block after the first
injector. Everything before the first injector runs once per image, without autograd. In the learned mode the
prior's visual tower reads the frozen encoder output, one extra no-grad encoder pass per image (sharing that stem).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lib.models.sam.image_encoder_tinyvit import TinyViTBlock, TinyViTImageEncoder
from lib.models.sam.image_encoder_vit import ImageEncoderViT
from lib.models.sam.sam import Sam
from lib.tpdrseg.model.prior_encoder import ClipVisualPrior, ExplicitPriorEncoder, LearnedVisualPrior
from lib.tpdrseg.model.injector import PriorAlignedInjector
from lib.tpdrseg.model.prompt_generator import ClassPromptGenerator


class _ViTEmbed(nn.Module):
    """ImageEncoderViT's patch embedding + absolute positions as one step (holds the encoder unregistered)."""

    def __init__(self, encoder: ImageEncoderViT):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.patch_embed(x) + self.encoder.pos_embed


def encoder_plan(encoder: nn.Module) -> Tuple[List[nn.Module], List[Optional[int]], List[bool]]:
    """The encoder trunk as steps taking and giving (B, H, W, C): (steps, width for attention blocks else None,
    whether the step is the last attention block of a stage). The neck (NCHW) follows the last step."""
    if isinstance(encoder, TinyViTImageEncoder):
        steps, dims, stage_end = [encoder.patch_embed], [None], [False]
        for stage in encoder.layers:
            for j, block in enumerate(stage.blocks):
                steps.append(block)
                dims.append(block.attn.qkv.in_features if isinstance(block, TinyViTBlock) else None)
                stage_end.append(j == len(stage.blocks) - 1 and isinstance(block, TinyViTBlock))
            if stage.downsample is not None:
                steps.append(stage.downsample)
                dims.append(None)
                stage_end.append(False)
        return steps, dims, stage_end
    if isinstance(encoder, ImageEncoderViT):
        blocks = list(encoder.blocks)
        return ([_ViTEmbed(encoder)] + blocks, [None] + [b.norm1.normalized_shape[0] for b in blocks],
                [False] * len(blocks) + [True])
    raise TypeError(f"TP-DRSeg has no injector plan for a {type(encoder).__name__} encoder")


class TPDRSeg(nn.Module):
    def __init__(self, sam: Sam, class_text: Tensor, class_names: Sequence[str] | None = None,
                 placement: str = "blocks", zoom: int = 4, num_sparse_tokens: int = 4, generator_hidden: int = 64,
                 prior: str = "learned", prior_hidden: int = 256, clip: nn.Module | None = None,
                 clip_image_size: int = 512):
        """
        sam: the base SAM (LiteMedSAM); its encoder is shared (frozen), its decoder copied (trained).
        class_text: (K_total, D) embeddings of the configured classes' descriptions (the text encoder's output).
        class_names: names of those classes, in order.
        placement: "blocks" or "stages" (see the module docstring); zoom: the injectors' projection stride.
        num_sparse_tokens: sparse prompt tokens per class; generator_hidden: the dense branch's width.
        prior: "learned" (offline default: a trained projection of frozen SAM features into the text space) or
            "clip" (the paper: `clip`'s frozen dense image features, seen at clip_image_size px).
        prior_hidden: hidden width of the learned projection.
        """
        super().__init__()
        if placement not in ("blocks", "stages"):
            raise ValueError(f"placement must be 'blocks' or 'stages', not {placement!r}")
        if prior not in ("learned", "clip"):
            raise ValueError(f"prior must be 'learned' or 'clip', not {prior!r}")
        class_text = torch.as_tensor(class_text, dtype=torch.float32)
        self.config = dict(class_names=list(class_names or [f"class_{i}" for i in range(len(class_text))]),
                           text_dim=int(class_text.shape[1]), placement=placement, zoom=zoom,
                           num_sparse_tokens=num_sparse_tokens, generator_hidden=generator_hidden, prior=prior,
                           prior_hidden=prior_hidden, clip_image_size=clip_image_size, image_size=sam.image_size)
        self.class_names = self.config["class_names"]
        self.register_buffer("class_text", class_text.clone())
        self.image_size = sam.image_size
        self.standardize = sam.standardize
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), persistent=False)

        self.image_encoder = sam.image_encoder
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)
        steps, dims, stage_end = encoder_plan(self.image_encoder)
        self._steps = steps
        where = [i for i, d in enumerate(dims) if d is not None and (placement == "blocks" or stage_end[i])]
        self.injector_steps = where
        self.injectors = nn.ModuleList(PriorAlignedInjector(dims[i], zoom) for i in where)

        embed_dim = sam.mask_decoder.transformer_dim
        embedding_size = tuple(sam.prompt_encoder.image_embedding_size)
        if prior == "learned":
            visual = LearnedVisualPrior(embed_dim, self.config["text_dim"], prior_hidden)
        else:
            if clip is None:
                raise ValueError("prior='clip' needs the CLIP model (e.g. CLIPTextEncoder(...).model)")
            visual = ClipVisualPrior(clip, clip_image_size)
        self.prior_encoder = ExplicitPriorEncoder(visual)
        if prior == "clip":
            for p in self.prior_encoder.parameters():
                p.requires_grad_(False)  # the paper's prior is not trained (and the aux loss is for the learned one)
        self.prompt_generator = ClassPromptGenerator(embed_dim, embedding_size, num_sparse_tokens, generator_hidden,
                                                     sam.prompt_encoder.no_mask_embed.weight)
        self.mask_decoder = copy.deepcopy(sam.mask_decoder)
        for p in self.mask_decoder.parameters():
            p.requires_grad_(True)
        # Only the single-mask output is used (one mask per text prompt, multimask_output=False) and the loss has no
        # IoU term: the IoU head and the three multimask hypernetworks get no gradient, so they stay as SAM's.
        for head in [self.mask_decoder.iou_prediction_head, *self.mask_decoder.output_hypernetworks_mlps[1:]]:
            for p in head.parameters():
                p.requires_grad_(False)
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
        self.image_encoder.eval()
        # Recompute each encoder step in the backward pass instead of keeping its activations (training only):
        # about 1/3 more time for a fraction of the memory, which grows with images x classes per step.
        self.gradient_checkpointing = False

    # -- modes and parameters ----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen BatchNorm statistics (and the encoders' fused eval paths)
        return self

    def trainable_state(self) -> Dict[str, Tensor]:
        """The trained tensors only (injectors, generator, learned prior, decoder): 4.4 M values (17.7 MB float32) on
        LiteMedSAM, 80% of them the decoder; not the frozen backbone."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: Dict[str, Tensor]) -> "TPDRSeg":
        load_trainable_parameters(self, state, "TP-DRSeg")
        return self

    def parameter_counts(self) -> Dict[str, int]:
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "image_encoder": count(self.image_encoder), "injectors": count(self.injectors),
                "prior_encoder": count(self.prior_encoder), "prompt_generator": count(self.prompt_generator),
                "mask_decoder": count(self.mask_decoder)}

    # -- forward -----------------------------------------------------------------------------------------------
    def _text(self, batch: int, classes: Tensor | Sequence[int] | None, text: Tensor | None) -> Tensor:
        """-> (B, K, D) text embeddings: of `classes` ((K,) or (B, K) indices into class_text; all when None and no
        text), or `text` itself ((K, D) or (B, K, D), e.g. free text embedded by the same text encoder)."""
        if text is None:
            idx = torch.arange(len(self.class_text), device=self.class_text.device) if classes is None else \
                torch.as_tensor(classes, device=self.class_text.device).long()
            text = self.class_text[idx]
        text = text.to(self.class_text.device, torch.float32)
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(batch, -1, -1)
        if text.shape[0] != batch or text.shape[-1] != self.class_text.shape[1]:
            raise ValueError(f"text embeddings {tuple(text.shape)} do not fit {batch} images of "
                             f"{self.class_text.shape[1]}-d text")
        return text

    @staticmethod
    def _step(x: Tensor, prior: Tensor, step: nn.Module | None, injector: nn.Module | None) -> Tensor:
        if step is not None:
            x = step(x)
        return injector(x, prior) if injector is not None else x

    def _neck(self, x: Tensor) -> Tensor:
        return self.image_encoder.neck(x.permute(0, 3, 1, 2)).contiguous()

    def normalize(self, images01: Tensor) -> Tensor:
        return (images01 * 255.0 - self.pixel_mean) / self.pixel_std if self.standardize else images01

    def forward(self, images: Tensor, classes: Tensor | Sequence[int] | None = None, text: Tensor | None = None,
                return_aux: bool = False):
        """images (B, 3, S, S) in [0, 1] -> mask logits (B, K, S, S), one map per class (text prompt).

        With return_aux also a dict: prior (B, K, h, w) P_e, similarity S, iou_pred (B, K)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        b = images.shape[0]
        text = self._text(b, classes, text)
        k = text.shape[1]
        first = self.injector_steps[0] if self.injector_steps else len(self._steps) - 1
        x = self.normalize(images)
        with torch.no_grad():  # frozen and prior-free: once per image for all K classes
            for step in self._steps[:first + 1]:
                x = step(x)
            shared = x
            if self.config["prior"] == "learned":
                for step in self._steps[first + 1:]:
                    x = step(x)
                frozen_embedding = self._neck(x)
        prior, similarity = self.prior_encoder(frozen_embedding if self.config["prior"] == "learned" else images, text)
        flat_prior = prior.flatten(0, 1)  # (B * K, h, w), image-major like the repeated features
        x = shared.repeat_interleave(k, dim=0)
        injectors = dict(zip(self.injector_steps, self.injectors))
        for i in range(first, len(self._steps)):
            step = self._steps[i] if i > first else None
            if self.gradient_checkpointing and torch.is_grad_enabled() and self.training:
                x = checkpoint(self._step, x, flat_prior, step, injectors.get(i), use_reentrant=False)
            else:
                x = self._step(x, flat_prior, step, injectors.get(i))
        features = self._neck(x)  # (B * K, C, h, w)
        sparse, dense = self.prompt_generator(features, flat_prior)
        low_res, iou = self.mask_decoder(features, self.image_pe, sparse, dense, multimask_output=False)
        logits = class_logits(low_res, b, k, images.shape[-2:])
        if not return_aux:
            return logits
        return logits, {"prior": prior, "similarity": similarity, "iou_pred": iou[:, 0].reshape(b, k)}

    # -- training objective ------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor, aux: Dict[str, Tensor] | None = None,
             prior_weight: float = 0.0, fg_weight_cap: float = 0.0) -> Tuple[Tensor, Dict[str, float]]:
        """The paper's BCE + IoU loss, averaged over the (image, class) maps; plus, with prior_weight > 0 and the
        learned prior, BCE of a * S + b against the max-pooled mask on the prior grid (our addition: it teaches the
        stand-in visual tower to point at the class's lesions, which CLIP does without training). fg_weight_cap > 0:
        lesion pixels weighted in the BCE (see lesion_bce)."""
        target = target.to(logits.dtype)
        bce = lesion_bce(logits, target, fg_weight_cap)
        iou = soft_iou_loss(logits, target)
        total = bce + iou
        parts = {"bce": float(bce.detach()), "iou": float(iou.detach())}
        if prior_weight > 0 and aux is not None and self.config["prior"] == "learned":
            s = aux["similarity"]
            small = F.adaptive_max_pool2d(target, s.shape[-2:])
            prior_loss = F.binary_cross_entropy_with_logits(self.prior_encoder.prior_logits(s), small)
            total = total + prior_weight * prior_loss
            parts["prior"] = float(prior_loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts


def class_logits(low_res: Tensor, batch: int, classes: int, size) -> Tensor:
    """The decoder's single-mask output (B * K, 1, h, w), image-major, -> (B, K, *size) logits at the input size."""
    logits = low_res[:, 0]
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(low_res, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return logits.reshape(batch, classes, *size)


def load_trainable_parameters(module: nn.Module, state: Dict[str, Tensor], what: str) -> None:
    """Copy `state` into `module`'s trainable parameters, strictly: the same names and shapes, or a ValueError that
    says which (a weights file of another model or configuration)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise ValueError(f"weights do not fit this {what}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise ValueError(f"{n}: shape {tuple(v.shape)} in the file, {tuple(params[n].shape)} in the model")
            params[n].copy_(v)


def lesion_bce(logits: Tensor, target: Tensor, fg_weight_cap: float = 0.0) -> Tensor:
    """Binary CE over (..., h, w) maps. fg_weight_cap > 0 (our addition, as in One-Prompt's loss): each map's lesion
    pixels weighted by sqrt(background / foreground), capped. Lesions cover ~0.1-1% of a 256 px fundus image and with
    the plain mean BCE the decoder settles on all background (IoU loss 0.99 after 120 steps at batch 2, lr 3e-4);
    0: the paper's plain BCE."""
    if fg_weight_cap <= 0:
        return F.binary_cross_entropy_with_logits(logits, target)
    fg = target.flatten(-2).mean(-1).clamp(1e-4, 1.0)
    weight = torch.sqrt((1 - fg) / fg).clamp(1.0, fg_weight_cap)[..., None, None]
    return F.binary_cross_entropy_with_logits(logits, target, weight=1 + (weight - 1) * target)


def soft_iou_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft IoU per (h, w) map (sum p g + 1) / (sum p + g - p g + 1), averaged over the maps."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum((-2, -1))
    union = (p + target - p * target).sum((-2, -1))
    return (1 - (inter + smooth) / (union + smooth)).mean()


def build_tpdrseg(sam: Sam | None = None, text_encoder="minilm", catalogue=None, clip_weights: str | None = None,
                  device: str | torch.device = "cpu", class_text: str = "description", **kwargs) -> TPDRSeg:
    """TP-DRSeg on LiteMedSAM (default) with the configured lesion classes (configs/lesions.yaml).

    text_encoder: "minilm" (offline default, learned prior), "clip" (needs clip_weights; the paper's CLIP prior),
    or an encoder object with encode(texts) -> (N, D). class_text: "description" (each class's `prompt`, the explicit
    description: the method) or "name" (the bare class name: the paper's ablation baseline)."""
    from lib.tpdrseg.model.descriptions import LesionCatalogue
    from lib.tpdrseg.model.text_encoder import build_text_encoder

    if sam is None:
        from lib.models.sam.build import build_litemedsam
        sam = build_litemedsam()
    catalogue = catalogue or LesionCatalogue.load()
    if isinstance(text_encoder, str):
        text_encoder = build_text_encoder(text_encoder, clip_weights)
    class_embedding = text_encoder.encode(catalogue.class_texts(class_text))
    if getattr(text_encoder, "name", "") == "clip":
        kwargs.setdefault("prior", "clip")
        kwargs.setdefault("clip", text_encoder.model)
    model = TPDRSeg(sam, class_embedding, [c.key for c in catalogue], **kwargs)
    model.config["class_text"] = class_text
    return model.to(device)
