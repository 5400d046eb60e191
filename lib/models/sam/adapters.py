"""Medical SAM Adapter (MSA; Wu et al., Medical Image Analysis 2025): bottleneck adapters in a frozen SAM, and a depth branch for volumes.

- Encoder: two adapters per attention block (TinyViT or ViT). The first after the attention, before the residual
  add (with its own skip, so x + Adapter(attn)); the second beside the MLP in its residual path, scaled by s:
  x + MLP(n) + s * Adapter(n). The paper cites AdaptFormer for s; the authors' code uses 0.5.
- Depth branch (3D): a batch of B * D slices (the D slices of each stack consecutive) is also regrouped so that
  each token position attends across its D slices, with the block's own frozen attention weights, and the result,
  through a depth adapter, is added to the space branch. The regrouping is done on the whole slice, before any
  window partition (the authors' code does it after, mixing windows with slices).
- Decoder: three adapters in the first two-way block: (1) after the token-to-image cross-attention and its
  residual, its down-projection joined (before the ReLU) by a second down-projection of the prompt embedding;
  (2) beside the token MLP, as in the encoder; (3) after the image-to-token cross-attention's residual, followed
  by a residual and the block's LayerNorm. The second block and the mask head are trained fully (the paper), or
  frozen with adapters only (`train_decoder_tail=False`).

Every adapter's up-projection starts at zero, so an adapted model starts as exactly the frozen one (a depth
branch passes through its adapter with no skip for the same reason: untrained, it adds nothing).
Adapted blocks are new module objects that hold the base blocks' own (shared, frozen) submodules under the same
names: the backbone keys are unchanged, one backbone in memory serves any number of adapted copies, and an
adapter file holds only the trainable tensors.
"""

from __future__ import annotations

import contextvars
import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from lib.models.sam.image_encoder_tinyvit import TinyViTBlock, TinyViTImageEncoder, _as_nchw, _as_nhwc
from lib.models.sam.image_encoder_vit import ImageEncoderViT, ViTBlock
from lib.models.sam.sam import Sam
from lib.models.sam.transformer import TwoWayAttentionBlock

# Slices per stack in the batch the encoder is running on (1: independent 2D slices). A context variable, not a
# forward argument: the encoders keep the checkpoints' signatures and the stages need no plumbing. It is per
# thread and per asyncio task, so concurrent requests do not see each other's depth.
_DEPTH = contextvars.ContextVar("msa_depth", default=1)


@contextmanager
def volumetric(depth: int) -> Iterator[None]:
    """Run the adapted encoder on stacks: inside, a batch of B * depth slices is B stacks of `depth` slices."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    token = _DEPTH.set(int(depth))
    try:
        yield
    finally:
        _DEPTH.reset(token)


@dataclass(frozen=True)
class AdapterSettings:
    bottleneck_ratio: float = 0.125  # hidden width / block width (the authors' code: 0.25; see README for the count)
    mlp_scale: float = 0.5  # s, on the MLP-path adapter
    encoder_blocks: str | int = "all"  # the paper: "all" attention blocks; N: the last N (0: none, decoder only)
    depth_branch: bool = False
    decoder_adapters: bool = True
    # The paper also trains the decoder's second block, final attention and heads fully: 27% of LiteMedSAM (6% of ViT-B)
    # and a 10 MB file per label, for the same held-out Dice on the putamen (README); adapters alone are 1.6-2.6%.
    train_decoder_tail: bool = False

    def __post_init__(self):
        self.adapted_block_count(1)
        if not 0 < self.bottleneck_ratio <= 1:
            raise ValueError(f"bottleneck_ratio must be in (0, 1], got {self.bottleneck_ratio}")

    def adapted_block_count(self, blocks: int) -> int:
        if self.encoder_blocks == "all":
            return blocks
        try:
            count = int(self.encoder_blocks)
        except (TypeError, ValueError):
            count = -1
        if count < 0:
            raise ValueError(f"encoder_blocks must be 'all' or a number of blocks >= 0, got {self.encoder_blocks!r}")
        return min(count, blocks)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterSettings":
        known = {k: values[k] for k in asdict(cls()) if k in values}
        return cls(**known)


class Adapter(nn.Module):
    """Down-projection, ReLU, up-projection (zero at start), times `scale`; optionally plus its input (skip), and
    optionally conditioned on a prompt embedding added after its own down-projection."""

    def __init__(self, dim: int, ratio: float, scale: float = 1.0, skip: bool = False, prompt_dim: int = 0):
        super().__init__()
        hidden = max(1, round(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.prompt_down = nn.Linear(prompt_dim, hidden) if prompt_dim else None
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale
        self.skip = skip

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        hidden = self.down(x)
        if self.prompt_down is not None:
            if prompt is None:
                raise ValueError("this adapter is conditioned on the prompt embedding: give it")
            hidden = hidden + self.prompt_down(prompt)
        out = self.up(torch.relu(hidden)) * self.scale
        return x + out if self.skip else out


def depth_attention(x: Tensor, depth: int, attend) -> Tensor:
    """(B * D, H, W, C) slices -> each token attends over its D slices with `attend` ((B', D, C) -> same)."""
    bd, h, w, c = x.shape
    if bd % depth:
        raise ValueError(f"a batch of {bd} slices is not made of stacks of {depth}")
    tokens = x.reshape(bd // depth, depth, h, w, c).permute(0, 2, 3, 1, 4).reshape(-1, depth, c)
    out = attend(tokens).reshape(bd // depth, h, w, depth, c).permute(0, 3, 1, 2, 4)
    return out.reshape(bd, h, w, c)


class AdaptedTinyViTBlock(nn.Module):
    """A TinyViT block (its attention, local conv and MLP shared with the base block) with MSA's adapters."""

    def __init__(self, block: TinyViTBlock, settings: AdapterSettings):
        super().__init__()
        dim = block.attn.qkv.in_features
        self.window_size = block.window_size
        self.attn, self.local_conv, self.mlp = block.attn, block.local_conv, block.mlp
        self.space_adapter = Adapter(dim, settings.bottleneck_ratio, skip=True)
        self.mlp_adapter = Adapter(dim, settings.bottleneck_ratio, scale=settings.mlp_scale)
        self.depth_adapter = Adapter(dim, settings.bottleneck_ratio) if settings.depth_branch else None

    attention = TinyViTBlock.attention  # windowed attention over the slice (uses self.attn, self.window_size)

    def forward(self, x: Tensor) -> Tensor:
        update = self.space_adapter(self.attention(x))
        depth = _DEPTH.get()
        if self.depth_adapter is not None and depth > 1:
            update = update + self.depth_adapter(depth_attention(x, depth, self.attn.attend_tokens))
        x = x + update
        x = _as_nhwc(self.local_conv(_as_nchw(x)))
        # TinyViT's MLP normalises inside; the adapter sees the same normalised input.
        return x + self.mlp(x) + self.mlp_adapter(self.mlp.norm(x))


class AdaptedViTBlock(nn.Module):
    """A ViT block (norms, attention and MLP shared with the base block) with MSA's adapters."""

    def __init__(self, block: ViTBlock, settings: AdapterSettings):
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.window_size = block.window_size
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.space_adapter = Adapter(dim, settings.bottleneck_ratio, skip=True)
        self.mlp_adapter = Adapter(dim, settings.bottleneck_ratio, scale=settings.mlp_scale)
        self.depth_adapter = Adapter(dim, settings.bottleneck_ratio) if settings.depth_branch else None

    attention = ViTBlock.attention

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)
        update = self.space_adapter(self.attention(normed))
        depth = _DEPTH.get()
        if self.depth_adapter is not None and depth > 1:
            update = update + self.depth_adapter(depth_attention(normed, depth, self.attn.attend_tokens))
        x = x + update
        normed = self.norm2(x)
        return x + self.mlp(normed) + self.mlp_adapter(normed)


class AdaptedTwoWayBlock(nn.Module):
    """The decoder's first two-way block (its attention, MLP and norms shared) with MSA's three adapters."""

    def __init__(self, block: TwoWayAttentionBlock, settings: AdapterSettings):
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        for name in ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3", "norm4",
                     "cross_attn_image_to_token"):
            setattr(self, name, getattr(block, name))
        self.skip_first_layer_pe = block.skip_first_layer_pe
        ratio = settings.bottleneck_ratio
        self.prompt_adapter = Adapter(dim, ratio, skip=True, prompt_dim=dim)
        self.mlp_adapter = Adapter(dim, ratio, scale=settings.mlp_scale)
        self.image_adapter = Adapter(dim, ratio, skip=True)

    token_self_attention = TwoWayAttentionBlock.token_self_attention  # unchanged by MSA

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        queries = self.token_self_attention(queries, query_pe)
        keys_pe = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(queries + query_pe, keys_pe, keys)
        queries = self.norm2(self.prompt_adapter(queries, prompt=query_pe))  # (1): conditioned on the prompt
        queries = self.norm3(queries + self.mlp(queries) + self.mlp_adapter(queries))  # (2)
        keys = keys + self.cross_attn_image_to_token(keys_pe, queries + query_pe, queries)
        keys = self.norm4(self.image_adapter(keys))  # (3): residual, then the block's LayerNorm
        return queries, keys


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing `module`'s parameters, buffers and children; its own child table, so that
    replacing a child in the copy leaves the original alone."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def attention_blocks(encoder: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of each attention block of a TinyViT or ViT encoder, in order."""
    if isinstance(encoder, TinyViTImageEncoder):
        return [(stage.blocks, j) for stage in encoder.layers for j, block in enumerate(stage.blocks)
                if isinstance(block, TinyViTBlock)]
    if isinstance(encoder, ImageEncoderViT):
        return [(encoder.blocks, j) for j in range(len(encoder.blocks))]
    raise TypeError(f"no MSA adapters for a {type(encoder).__name__} encoder")


def add_adapters(base: Sam, settings: AdapterSettings) -> Sam:
    """A copy of `base` with MSA's adapters, sharing all of base's weights (frozen); only the adapters (and, with
    train_decoder_tail, deep copies of the decoder's tail) are new. `base` is not modified."""
    model = _shallow(base)
    encoder = model.image_encoder = _shallow(base.image_encoder)
    # New containers down to each adapted block.
    if isinstance(encoder, TinyViTImageEncoder):
        encoder.layers = nn.ModuleList(_shallow(stage) for stage in base.image_encoder.layers)
        for stage in encoder.layers:
            stage.blocks = nn.ModuleList(stage.blocks)
    else:
        encoder.blocks = nn.ModuleList(encoder.blocks)
    blocks = attention_blocks(encoder)
    count = settings.adapted_block_count(len(blocks))
    chosen = blocks[len(blocks) - count:]
    for container, j in chosen:
        block = container[j]
        container[j] = (AdaptedTinyViTBlock if isinstance(block, TinyViTBlock) else AdaptedViTBlock)(block, settings)

    decoder = model.mask_decoder = _shallow(base.mask_decoder)
    transformer = decoder.transformer = _shallow(base.mask_decoder.transformer)
    transformer.layers = nn.ModuleList(transformer.layers)
    if settings.decoder_adapters:
        transformer.layers[0] = AdaptedTwoWayBlock(transformer.layers[0], settings)
    if settings.train_decoder_tail:
        # Trained per label: each adapted model has its own copies (the base's stay as they were).
        for i in range(1, len(transformer.layers)):
            transformer.layers[i] = copy.deepcopy(transformer.layers[i])
        transformer.final_attn_token_to_image = copy.deepcopy(transformer.final_attn_token_to_image)
        transformer.norm_final_attn = copy.deepcopy(transformer.norm_final_attn)
        for name in ("output_upscaling", "output_hypernetworks_mlps", "iou_prediction_head"):
            setattr(decoder, name, copy.deepcopy(getattr(decoder, name)))
        decoder.iou_token = copy.deepcopy(decoder.iou_token)
        decoder.mask_tokens = copy.deepcopy(decoder.mask_tokens)
    model.adapter_settings = settings
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(name, settings))
    return model


def is_trainable(name: str, settings: AdapterSettings) -> bool:
    """Whether a parameter of an adapted model is one MSA trains (and an adapter file holds)."""
    if "adapter." in name:
        return True
    if not settings.train_decoder_tail or not name.startswith("mask_decoder."):
        return False
    if name.startswith("mask_decoder.transformer.layers.0."):
        return False
    return True


def adapter_state(model: Sam) -> dict[str, Tensor]:
    """The trainable tensors of an adapted model: what an adapter file holds."""
    settings = model.adapter_settings
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if is_trainable(name, settings)}


def load_adapter_state(model: Sam, state: dict[str, Tensor]) -> Sam:
    """Load an adapter file into an adapted model built with the same settings; every key must match."""
    expected = {name for name, _ in model.named_parameters() if is_trainable(name, model.adapter_settings)}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"adapter file does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))
    return model


def parameter_counts(model: Sam) -> dict:
    """Trainable and total parameters of an adapted model (shared backbone counted once)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for name, p in model.named_parameters() if is_trainable(name, model.adapter_settings))
    adapters = sum(p.numel() for name, p in model.named_parameters() if "adapter." in name)
    return {"total": total, "trainable": trainable, "adapters": adapters,
            "trainable_fraction": round(trainable / total, 4), "adapter_fraction": round(adapters / total, 4)}


def encoder_steps(encoder: nn.Module) -> list:
    """The encoder's forward pass as a list of steps (callables), each taking the previous one's output."""
    if isinstance(encoder, TinyViTImageEncoder):
        steps = [encoder.patch_embed]
        for stage in encoder.layers:
            steps += list(stage.blocks) + ([stage.downsample] if stage.downsample is not None else [])
        return steps + [lambda x: encoder.neck(_as_nchw(x)).contiguous()]
    if isinstance(encoder, ImageEncoderViT):
        return ([lambda x: encoder.patch_embed(x) + encoder.pos_embed] + list(encoder.blocks)
                + [lambda x: encoder.neck(x.permute(0, 3, 1, 2)).contiguous()])
    raise TypeError(f"no MSA adapters for a {type(encoder).__name__} encoder")


def split_encoder(model: Sam):
    """(frozen_part, adapted_part): frozen_part(normalised image) runs the steps before the first adapted block
    (its output can be computed once per training slice and kept), adapted_part(features) the rest."""
    steps = encoder_steps(model.image_encoder)
    adapted = [i for i, step in enumerate(steps) if isinstance(step, (AdaptedTinyViTBlock, AdaptedViTBlock))]
    first = adapted[0] if adapted else len(steps) - 1  # no encoder adapter: only the neck is left to run

    def run(steps_, x):
        for step in steps_:
            x = step(x)
        return x

    return (lambda x: run(steps[:first], x)), (lambda x: run(steps[first:], x))
