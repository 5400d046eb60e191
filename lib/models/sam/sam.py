"""The composed promptable model: image encoder + prompt encoder + mask decoder, with the small API the app's
inference code uses (`encode` once per image, `decode` per prompt, `upscale_logits`)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.models.sam.mask_decoder import MaskDecoder
from lib.models.sam.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 image_size: int, pixel_mean: Optional[Sequence[float]] = None,
                 pixel_std: Optional[Sequence[float]] = None) -> None:
        """
        image_size: side of the square encoder input (256 LiteMedSAM, 1024 Meta SAM).
        pixel_mean, pixel_std: per-channel statistics on the 0-255 scale; the input in [0, 1] is scaled to
            0-255 and standardised with them (Meta SAM). None for both: the encoder takes [0, 1] as it is
            (LiteMedSAM was trained on [0, 1] inputs).
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        self.standardize = pixel_mean is not None
        mean = torch.tensor(pixel_mean if self.standardize else (0.0, 0.0, 0.0), dtype=torch.float32)
        std = torch.tensor(pixel_std if self.standardize else (1.0, 1.0, 1.0), dtype=torch.float32)
        # Not saved in checkpoints (Meta's and LiteMedSAM's have no such entries): strict loading still works.
        self.register_buffer("pixel_mean", mean.view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(-1, 1, 1), persistent=False)

    def normalize(self, image01: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> what the image encoder was trained on."""
        if not self.standardize:
            return image01
        return (image01 * 255.0 - self.pixel_mean) / self.pixel_std

    def encode(self, image01: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1], S = image_size (already resized / padded) -> (B, 256, 64, 64) embedding."""
        if image01.ndim != 4 or image01.shape[1] != 3 or tuple(image01.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}), got {tuple(image01.shape)}")
        return self.image_encoder(self.normalize(image01))

    def decode(self, embeddings: Tensor, point_coords: Optional[Tensor] = None,
               point_labels: Optional[Tensor] = None, boxes: Optional[Tensor] = None,
               mask_logits: Optional[Tensor] = None, multimask_output: bool = False,
               prompt_encoder: Optional[PromptEncoder] = None) -> Tuple[Tensor, Tensor]:
        """Low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M); M = 3 with multimask_output, else 1.

        embeddings (B or 1, C, h, w); point_coords (B, N, 2) as x, y pixel coordinates in the image_size input
        frame, point_labels (B, N) 1 foreground, 0 background, -1 padding; boxes (B, 4) x0, y0, x1, y1 in the
        same frame; mask_logits (B, 1, 4h, 4w) earlier low-res logits. Inputs may be numpy-backed or float64:
        they are moved to the model's device and dtype. prompt_encoder: a learned one (SAMassist) to use instead
        of the model's own, per call, so that requests with different prompt encoders can share the model."""
        prompt_encoder = prompt_encoder if prompt_encoder is not None else self.prompt_encoder
        weight = prompt_encoder.no_mask_embed.weight
        device, dtype = weight.device, weight.dtype
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords given without point_labels")
            coords = torch.as_tensor(point_coords, device=device, dtype=dtype)
            labels = torch.as_tensor(point_labels, device=device).long()
            points = (coords, labels)
        if boxes is not None:
            boxes = torch.as_tensor(boxes, device=device, dtype=dtype)
        if mask_logits is not None:
            mask_logits = mask_logits.to(device=device, dtype=dtype)
        sparse, dense = prompt_encoder(points, boxes, mask_logits)
        return self.mask_decoder(embeddings, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)

    def upscale_logits(self, low_res_logits: Tensor) -> Tensor:
        """(B, M, 4h, 4w) -> (B, M, image_size, image_size), bilinear."""
        return F.interpolate(low_res_logits, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)
