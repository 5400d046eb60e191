"""CLIP (ViT image tower + text transformer), our own PyTorch modules, loading user-supplied weights.

No CLIP weights are available offline, so nothing is downloaded: `load_clip(path)` reads a local file in one of the
usual layouts and builds the model from the tensor shapes (as OpenAI's `build_model` does):

* OpenAI `ViT-B-16.pt` (TorchScript archive, fp16) or its state dict, and open_clip checkpoints of the same
  architecture (same key names: `visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
  `token_embedding`, `text_projection`, ...; `module.` prefixes are stripped);
* Hugging Face `CLIPModel` (`pytorch_model.bin` / `model.safetensors`, keys `text_model.*`, `vision_model.*`,
  `text_projection.weight`, `visual_projection.weight`), converted to the OpenAI names (q/k/v concatenated into
  `in_proj_*`, projections transposed).

The activation is QuickGELU (x * sigmoid(1.702 x)) as in OpenAI's weights; open_clip's own LAION-trained ViT-B-16
uses exact GELU: pass `quick_gelu=False` (HF checkpoints say which in their config; default here: QuickGELU).

`dense_image_features` gives TP-DRSeg's visual prior P_v (H_s x W_s x C_t): per-patch features in the joint embedding
space. Plain CLIP patch tokens are poorly localised, so by default the last block's attention is replaced by its value
path (MaskCLIP, Zhou et al. ECCV 2022: v-projection -> out-projection, no query-key mixing), then ln_post and the
projection; `mode="tokens"` keeps the ordinary last block. Positional embeddings are bicubically resized for inputs
other than the training resolution (224 for ViT-B/16 -> 14 x 14; 256 -> 16 x 16).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.tpdrseg.model.weights_io import read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_layers: int = 12
    quick_gelu: bool = True

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    @property
    def transformer_heads(self) -> int:
        return max(1, self.transformer_width // 64)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_weight/bias, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """out_proj(v): the attention output if every token attended only to itself (MaskCLIP)."""
        d = x.shape[-1]
        v = F.linear(x, self.in_proj_weight[2 * d:], self.in_proj_bias[2 * d:])
        return self.out_proj(v)


class _MLP(nn.Module):
    def __init__(self, width: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = _MLP(width, quick_gelu)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        w, p = c.vision_width, c.vision_patch_size
        self.patch_size = p
        self.grid = c.image_resolution // p
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        scale = w ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, c.vision_layers, c.vision_heads, c.quick_gelu)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, c.embed_dim))

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.positional_embedding
        if (gh, gw) == (self.grid, self.grid):
            return pos
        grid = pos[1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.conv1(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos(gh, gw).to(x.dtype)
        return self.ln_pre(x), gh, gw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, embed_dim), not normalised."""
        x, _, _ = self._tokens(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj

    def dense(self, x: torch.Tensor, mode: str = "maskclip") -> torch.Tensor:
        """Per-patch embeddings (B, H_s, W_s, embed_dim), not normalised."""
        x, gh, gw = self._tokens(x)
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        if mode == "maskclip":
            x = x + last.attn.value_path(last.ln_1(x))
            x = x + last.mlp(last.ln_2(x))
        elif mode == "tokens":
            x = last(x)
        else:
            raise ValueError(f"mode must be 'maskclip' or 'tokens', not {mode!r}")
        x = self.ln_post(x[:, 1:]) @ self.proj
        return x.reshape(x.shape[0], gh, gw, -1)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(c.context_length, c.transformer_width))
        self.ln_final = nn.LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(c.transformer_width ** -0.5 * torch.randn(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", torch.full((c.context_length, c.context_length), float("-inf")).triu(1),
                             persistent=False)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) text embedding at the end-of-text token (the highest id), not normalised."""
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        x = self.transformer(x, self.attn_mask[:n, :n].to(x.dtype))
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def dense_image_features(self, images: torch.Tensor, mode: str = "maskclip") -> torch.Tensor:
        return self.visual.dense(images, mode)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> CLIP's mean/std normalisation."""
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------------------- layouts
def hf_to_openai(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face `CLIPModel` keys -> OpenAI keys."""
    out: Dict[str, torch.Tensor] = {}
    towers = {"text_model.encoder.layers.": "transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        for src, dst in towers.items():
            if key.startswith(src):
                idx, rest = key[len(src):].split(".", 1)
                prefix = f"{dst}{idx}."
                if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                    pending.setdefault(prefix, {})[rest[len("self_attn."):]] = value
                else:
                    for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                        rest = rest.replace(old, new)
                    out[prefix + rest] = value
                break
        else:
            simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                      "text_model.embeddings.position_embedding.weight": "positional_embedding",
                      "text_model.final_layer_norm.weight": "ln_final.weight",
                      "text_model.final_layer_norm.bias": "ln_final.bias",
                      "vision_model.embeddings.class_embedding": "visual.class_embedding",
                      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                      "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                      "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                      "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                      "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                      "logit_scale": "logit_scale"}
            if key in simple:
                out[simple[key]] = value
            elif key == "text_projection.weight":
                out["text_projection"] = value.t().contiguous()
            elif key == "visual_projection.weight":
                out["visual.proj"] = value.t().contiguous()
            else:
                raise KeyError(f"unexpected Hugging Face CLIP key {key!r}")
    for prefix, qkv in pending.items():
        out[prefix + "attn.in_proj_weight"] = torch.cat([qkv[f"{n}_proj.weight"] for n in "qkv"])
        out[prefix + "attn.in_proj_bias"] = torch.cat([qkv[f"{n}_proj.bias"] for n in "qkv"])
    return out


def to_openai_layout(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("text_model.") for k in state):
        state = hf_to_openai(state)
    drop = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
    return {k: v for k, v in state.items() if k not in drop}


def config_from_state_dict(state: Mapping[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    conv = state["visual.conv1.weight"]
    vision_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPConfig(
        embed_dim=state["text_projection"].shape[1], image_resolution=grid * conv.shape[-1],
        vision_layers=vision_layers,
        vision_width=conv.shape[0], vision_patch_size=conv.shape[-1],
        context_length=state["positional_embedding"].shape[0], vocab_size=state["token_embedding.weight"].shape[0],
        transformer_width=state["ln_final.weight"].shape[0],
        transformer_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        quick_gelu=quick_gelu)


def load_clip(path: str | os.PathLike, quick_gelu: bool = True) -> CLIP:
    """A frozen CLIP (eval mode, float32) from a local checkpoint in the OpenAI / open_clip / Hugging Face layout: a
    file, or a folder holding one (a Hugging Face folder's config.json decides the activation)."""
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):  # Hugging Face: the activation is in the config (default quick_gelu)
            with open(cfg_file) as f:
                act = (json.load(f).get("text_config") or {}).get("hidden_act", "quick_gelu")
            quick_gelu = act == "quick_gelu"
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "ViT-B-16.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no CLIP weight file")
    state = to_openai_layout(read_state_dict(path))
    model = CLIP(config_from_state_dict(state, quick_gelu))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
