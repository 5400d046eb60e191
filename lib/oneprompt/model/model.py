"""The One-Prompt model (Wu et al., CVPR 2024, Fig. 2a): a frozen image encoder shared by query and template, the prompt
encoder, and a decoder of One-Prompt Former blocks from coarse to fine with multi-scale skip connections.

Encoder features (LiteMedSAM's TinyViT, 256 x 256 input in [0, 1]; `encode` returns them, NCHW):
  "stage1" (B, 128, 128, 128)  end of TinyViT stage 1 (two attention blocks, stride 2)
  "stage2" (B, 160, 64, 64)    end of stage 2 (six attention blocks, stride 4)
  "neck"   (B, 256, 64, 64)    the SAM neck output (the embedding SAM's decoder reads)
(stage 0 is convolutional at full resolution, 64 x 256 x 256: too large to cache and too shallow to help.)

Decoder (defaults; C = 128):
  level 0: "neck"   pooled to 16 x 16 (N = 256)  -> Former block 0; e_s starts as these query tokens
  level 1: "stage2" pooled to 32 x 32 (N = 1024) -> Former block 1
  level 2: "stage1" pooled to 32 x 32 (N = 1024) -> Former block 2
Each level's map is average-pooled to its grid, then projected (Linear + LayerNorm, shared by query and
template: the same encoder made both) to C. Pooling before projecting is the same as after (both linear) and
much cheaper. The grids are kept small because the Prompt-Parser's w is N x N (1 M parameters at 32 x 32) and
attention is O(N^2).
Head: the last block's output as a 32 x 32 map, upsampled (transposed conv, LayerNorm2d, GELU) to 64 x 64 plus
a projection of the query's "neck", then to 128 x 128 plus a projection of the query's "stage1", a 3 x 3 and a
1 x 1 convolution to mask logits at 128 x 128, bilinearly upsampled to 256 x 256.

Trainable: the prompt encoder and the decoder (projections, Former blocks, head). The image encoder is frozen
and kept in eval mode (its BatchNorms must not see training batches); so is an attached SegLab autoencoder.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.models.sam.common import LayerNorm2d
from lib.models.sam.image_encoder_tinyvit import TinyViTBlock, TinyViTImageEncoder, _as_nchw
from lib.oneprompt.model.former import OnePromptFormerBlock
from lib.oneprompt.model.prompt_encoder import Prompt, PromptEncoder
from lib.oneprompt.model.seglab import SegLabAutoencoder

# (feature name, token grid side), coarse to fine.
DEFAULT_LEVELS: Tuple[Tuple[str, int], ...] = (("neck", 16), ("stage2", 32), ("stage1", 32))
# Query features added while upsampling the last block's output, coarse to fine.
DEFAULT_HEAD_SKIPS: Tuple[str, ...] = ("neck", "stage1")


class TinyViTFeatures(nn.Module):
    """A TinyViT image encoder as a multi-scale feature extractor: images (B, 3, S, S) in [0, 1] -> dict of
    NCHW maps "stage1", "stage2" (ends of those stages) and "neck" (the encoder's output)."""

    def __init__(self, encoder: TinyViTImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        dims = [stage.blocks[0].attn.qkv.in_features if isinstance(stage.blocks[0], TinyViTBlock) else None
                for stage in encoder.layers]
        strides = [1]
        for stage in encoder.layers[:-1]:
            strides.append(strides[-1] * stage.downsample.conv2.c.stride[0])
        self.feature_channels = {"stage1": dims[1], "stage2": dims[2], "neck": encoder.neck[0].out_channels}
        self.feature_strides = {"stage1": strides[1], "stage2": strides[2], "neck": strides[-1]}

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        enc = self.encoder
        x = enc.patch_embed(images)
        out = {}
        for i, stage in enumerate(enc.layers):
            for block in stage.blocks:
                x = block(x)
            if i in (1, 2):
                out[f"stage{i}"] = _as_nchw(x).contiguous()
            if stage.downsample is not None:
                x = stage.downsample(x)
        out["neck"] = enc.neck(_as_nchw(x)).contiguous()
        return out


def masked_prototype(fmap: Tensor, mask: Tensor) -> Tensor:
    """(B, C, h, w) features and (B, 1, H, W) mask weights in [0, 1] (H a multiple of h) -> (B, C): the features
    averaged under the mask, area-pooled to the feature grid (the prototype of PANet and PerSAM)."""
    cells = F.adaptive_avg_pool2d(mask.float(), fmap.shape[-1])
    return (fmap * cells).sum((2, 3)) / cells.sum((2, 3)).clamp_min(1e-6)


class OnePromptModel(nn.Module):
    def __init__(self, image_encoder: nn.Module, embed_dim: int = 128,
                 levels: Sequence[Tuple[str, int]] = DEFAULT_LEVELS,
                 head_skips: Sequence[str] = DEFAULT_HEAD_SKIPS, num_heads: int = 4, mlp_dim: int = 512,
                 image_size: int = 256, seglab: Optional[SegLabAutoencoder] = None,
                 prompt_map: bool = False, head_priors: bool = False) -> None:
        """
        image_encoder: a TinyViTImageEncoder (wrapped in TinyViTFeatures), or any module mapping (B, 3, S, S)
            images to a dict of NCHW feature maps with `feature_channels` and `feature_strides` dicts.
        embed_dim: C, the decoder width.
        levels: (feature name, token grid side) per Former block, coarse to fine.
        head_skips: query features added by the head while upsampling, coarse to fine; each must be an
            integer multiple finer than the step before.
        num_heads, mlp_dim: the Former blocks' attention heads and FFN width.
        image_size: S, the encoder's input side (prompt coordinates are pixels of this frame).
        seglab: a trained SegLab autoencoder for SegLab prompts (optional, frozen).
        prompt_map: also add the prompt, drawn on the template (PromptEncoder.prompt_map) and pooled to each
            level's grid, to the template tokens through a 1 x 1 projection (zero at initialisation), as SAM adds
            a mask prompt's dense embedding to its image tokens. Not in the paper: there, where the prompt is
            reaches the decoder only through p1, p2 compared with query tokens (eqs. 1-2), i.e. only where the
            template and the query are aligned; trained on our data without it, the decoder did not learn.
        head_priors: give the head two maps computed from the drawn prompt (no parameters): where the prompt
            is, carried over to the query frame (medical templates and queries are mostly aligned), and the
            query's cosine similarity to the prompted template features (the template "neck" averaged under
            the drawn prompt: the prototype of PerSAM and PANet), plus the similarity to the unprompted rest.
            A 1 x 1 projection adds them to the head's finest map. Not in the paper (it does not describe its
            head): on our CPU budget the decoder did not learn without a direct path from prompt to output.
        """
        super().__init__()
        if isinstance(image_encoder, TinyViTImageEncoder):
            image_encoder = TinyViTFeatures(image_encoder)
        self.image_encoder = image_encoder
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)
        self.image_encoder.eval()
        channels, strides = image_encoder.feature_channels, image_encoder.feature_strides
        self.image_size = image_size
        self.levels = tuple((str(name), int(grid)) for name, grid in levels)
        self.head_skips = tuple(head_skips)
        self.prompt_encoder = PromptEncoder(embed_dim, (image_size, image_size), seglab)
        self.level_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(channels[name], embed_dim), nn.LayerNorm(embed_dim)) for name, _ in self.levels)
        self.prompt_map = bool(prompt_map)
        self.prompt_map_proj = nn.ModuleList(nn.Linear(2, embed_dim) for _ in self.levels) if prompt_map else None
        if self.prompt_map_proj is not None:
            for proj in self.prompt_map_proj:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
        self.blocks = nn.ModuleList(
            OnePromptFormerBlock(embed_dim, (grid, grid), num_heads, mlp_dim) for _, grid in self.levels)
        # Head.
        self.upscale = nn.ModuleList()
        self.skip_proj = nn.ModuleList()
        side, width = self.levels[-1][1], embed_dim
        for name in self.head_skips:
            target = image_size // strides[name]
            if target % side:
                raise ValueError(f"head skip {name!r} ({target} x {target}) is not a multiple of {side} x {side}")
            ratio, out = target // side, max(width // 2, 8)
            self.upscale.append(nn.Sequential(nn.ConvTranspose2d(width, out, ratio, stride=ratio),
                                              LayerNorm2d(out), nn.GELU()))
            self.skip_proj.append(nn.Conv2d(channels[name], out, 1))
            side, width = target, out
        self.head_priors = bool(head_priors)
        self.prior_proj = nn.Conv2d(3, width, 1) if head_priors else None
        self.mask_head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 1, 1))

    # -- modes and bookkeeping ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "OnePromptModel":
        super().train(mode)
        self.image_encoder.eval()  # frozen, BatchNorm statistics included
        return self

    def parameter_counts(self) -> Dict[str, int]:
        def count(module, trainable=None):
            return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
        return {"total": count(self), "trainable": count(self, True), "image_encoder": count(self.image_encoder),
                "prompt_encoder": count(self.prompt_encoder),
                "decoder": count(self) - count(self.image_encoder) - count(self.prompt_encoder),
                "prompt_parsers": sum(count(block.parser) for block in self.blocks)}

    # -- encoder --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Dict[str, Tensor]:
        """(B, 3, S, S) in [0, 1] -> the encoder's feature maps (module docstring); cacheable (e.g. in fp16)."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        return self.image_encoder(images)

    # -- decoder --------------------------------------------------------------------------------------------
    def level_tokens(self, features: Dict[str, Tensor], level: int) -> Tensor:
        """One level's feature map -> (B, g * g, C) tokens on its grid."""
        name, grid = self.levels[level]
        weight = self.level_proj[level][0].weight
        fmap = features[name].to(weight.device, weight.dtype)
        if fmap.shape[-1] != grid or fmap.shape[-2] != grid:
            fmap = F.adaptive_avg_pool2d(fmap, grid)
        return self.level_proj[level](fmap.flatten(2).transpose(1, 2))

    def grid_pe(self, grid: int) -> Tensor:
        """(1, grid * grid, C) positional encodings of a grid's cells (the prompt encoder's pe_layer)."""
        return self.prompt_encoder.pe_layer((grid, grid)).flatten(1).transpose(0, 1).unsqueeze(0)

    def forward(self, query_features: Dict[str, Tensor], template_features: Dict[str, Tensor],
                prompt: Union[Prompt, Tuple[Tensor, Tensor]]) -> Tensor:
        """Mask logits (B, 1, S, S) for B queries. query_features from `encode`; template_features likewise,
        for B templates or one shared by all queries; prompt: a Prompt on the template(s), or its (p1, p2)."""
        p1, p2 = self.prompt_encoder(prompt) if isinstance(prompt, Prompt) else prompt
        drawn = None
        if self.prompt_map or self.head_priors:
            if not isinstance(prompt, Prompt):
                raise ValueError("a model with prompt_map=True needs the Prompt, not its (p1, p2)")
            drawn = self.prompt_encoder.prompt_map(prompt)  # (B_t, 2, S, S)
        e_s = pe_prev = None
        batch = None
        for level, block in enumerate(self.blocks):
            grid = self.levels[level][1]
            e_q = self.level_tokens(query_features, level)
            batch = e_q.shape[0]
            e_t = self.level_tokens(template_features, level)
            if self.prompt_map:
                cells = F.adaptive_avg_pool2d(drawn.to(e_t.dtype), grid).flatten(2).transpose(1, 2)
                e_t = e_t + self.prompt_map_proj[level](cells)
            e_t = e_t.expand(batch, -1, -1)
            pe = self.grid_pe(grid)
            if e_s is None:  # the first block decodes the down-sampled query feature itself
                e_s, pe_prev = e_q, pe
            e_s = block(e_s, e_q, e_t, p1, p2, pe, pe_prev)
            pe_prev = pe
        grid = self.levels[-1][1]
        x = e_s.transpose(1, 2).reshape(batch, -1, grid, grid)
        for name, up, proj in zip(self.head_skips, self.upscale, self.skip_proj):
            skip = query_features[name].to(x.device, x.dtype)
            x = up(x) + proj(skip)
        if self.head_priors:
            x = x + self.prior_proj(self.prompt_priors(query_features, template_features, drawn, x.shape[-1]))
        logits = self.mask_head(x)
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return logits

    def prompt_priors(self, query_features: Dict[str, Tensor], template_features: Dict[str, Tensor],
                      drawn: Tensor, side: int) -> Tensor:
        """(B, 3, side, side): the drawn prompt's positive-minus-negative map resized to the head's grid, and
        the query's cosine similarity to the prompted and to the unprompted template "neck" features."""
        q = query_features["neck"].float()
        t = template_features["neck"].float().to(q.device)
        inside = drawn[:, :1].float().to(q.device)
        proto_in = masked_prototype(t, inside)  # (B_t, C)
        proto_out = masked_prototype(t, 1 - inside)
        qn = F.normalize(q, dim=1)
        sim_in = torch.einsum("bchw,bc->bhw", qn, F.normalize(proto_in, dim=1).expand(q.shape[0], -1))
        sim_out = torch.einsum("bchw,bc->bhw", qn, F.normalize(proto_out, dim=1).expand(q.shape[0], -1))
        location = (drawn[:, :1] - drawn[:, 1:]).float().to(q.device).expand(q.shape[0], -1, -1, -1)
        maps = torch.cat([F.interpolate(location, size=(side, side), mode="area"),
                          F.interpolate(torch.stack([sim_in, sim_out], 1), size=(side, side), mode="bilinear",
                                        align_corners=False)], 1)
        dtype = self.prior_proj.weight.dtype
        return maps.to(dtype)


def build_oneprompt(checkpoint: Optional[str] = None, seglab: Optional[SegLabAutoencoder] = None,
                    **kwargs) -> OnePromptModel:
    """One-Prompt on LiteMedSAM's pretrained TinyViT encoder (weights from `checkpoint`, by default the verified
    bundled LiteMedSAM file; see lib.models.sam.build). The decoder and prompt encoder start untrained."""
    from lib.models.sam.build import build_litemedsam

    encoder = build_litemedsam(checkpoint).image_encoder
    return OnePromptModel(encoder, seglab=seglab, **kwargs)
