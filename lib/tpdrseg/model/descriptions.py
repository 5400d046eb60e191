"""Lesion classes and their written descriptions (`configs/lesions.yaml`), and mapping typed text to a class.

`LesionCatalogue.match(text)` returns the configured class a user's text names, or None for free text (which the
model then embeds as typed). Text and synonyms are compared after `normalise`: lower case, accents and punctuation
removed, hyphens/slashes as spaces, British spellings folded to American (haem->hem, ae->e, oe->e, fibre->fiber),
plural -s/-es/-ies dropped per word, filler words ("segment", "the", "all", "lesions", ...) dropped. Long words may
have typos: one edit for 5-8 characters, two for 9 or more (whole normalised phrase, Levenshtein). A class's own
prompt or description text also maps to it.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LESIONS_FILE = REPO_ROOT / "configs" / "lesions.yaml"

_FILLER = {"the", "a", "an", "all", "any", "of", "in", "on", "segment", "segmentation", "show", "find", "detect",
           "mask", "lesion", "label", "please", "me", "retinal", "diabetic", "retinopathy", "dr"}
_SPELLING = [(r"haem", "hem"), (r"oede", "ede"), (r"ae", "e"), (r"oe", "e"), (r"fibre", "fiber"),
             (r"colour", "color"), (r"grey", "gray"), (r"micrometre", "micrometer")]


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalise(text: str, drop_filler: bool = True) -> str:
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9]+", " ", text)
    words = []
    for word in text.split():
        for old, new in _SPELLING:
            word = word.replace(old, new)
        word = _singular(word)
        if not (drop_filler and word in _FILLER):
            words.append(word)
    return " ".join(words)


def _edit_distance(a: str, b: str, limit: int) -> int:
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass
class LesionClass:
    key: str
    label: int
    name: str
    abbreviation: str
    prompt: str
    description: str
    synonyms: List[str] = field(default_factory=list)
    references: List[str] = field(default_factory=list)

    def names(self) -> List[str]:
        return [self.key.replace("_", " "), self.name, self.abbreviation, *self.synonyms]


class LesionCatalogue:
    def __init__(self, classes: Sequence[LesionClass]):
        self.classes = list(classes)
        self.by_key = {c.key: c for c in self.classes}
        self.by_label = {c.label: c for c in self.classes}
        if len(self.by_key) != len(self.classes) or len(self.by_label) != len(self.classes):
            raise ValueError("lesion classes need unique keys and labels")
        self._exact: Dict[str, LesionClass] = {}
        for c in self.classes:
            for text in [*c.names(), c.prompt, c.description]:
                key = normalise(text)
                other = self._exact.get(key)
                if other is not None and other is not c:
                    raise ValueError(f"{text!r} names both {other.key} and {c.key}")
                if key:
                    self._exact[key] = c

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "LesionCatalogue":
        with open(path or DEFAULT_LESIONS_FILE, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        classes = []
        for key, entry in (data.get("classes") or {}).items():
            missing = {"label", "name", "prompt"} - set(entry)
            if missing:
                raise ValueError(f"lesion class {key!r}: missing {sorted(missing)}")
            classes.append(LesionClass(
                key=key, label=int(entry["label"]), name=str(entry["name"]),
                abbreviation=str(entry.get("abbreviation", "")), prompt=" ".join(str(entry["prompt"]).split()),
                description=" ".join(str(entry.get("description", entry["prompt"])).split()),
                synonyms=[str(s) for s in entry.get("synonyms", [])],
                references=[str(r) for r in entry.get("references", [])]))
        return cls(sorted(classes, key=lambda c: c.label))

    def match(self, text: str) -> Optional[LesionClass]:
        """The class `text` names, or None (free text)."""
        key = normalise(text)
        if not key:
            return None
        if key in self._exact:
            return self._exact[key]
        if len(key) < 5:
            return None
        limit = 1 if len(key) < 9 else 2
        best, best_d, tie = None, limit + 1, False
        for name, c in self._exact.items():
            if len(name) < 5 or len(name) > 40:
                continue
            d = _edit_distance(key, name, limit)
            if d < best_d:
                best, best_d, tie = c, d, False
            elif d == best_d and best is not None and c is not best:
                tie = True
        return None if tie else best

    CLASS_TEXTS = {"description": "prompt", "name": "name"}

    def class_texts(self, kind: str = "description") -> List[str]:
        """The text each class is embedded from: "description" (its explicit description, the method) or "name" (the
        bare class name, the paper's ablation baseline)."""
        if kind not in self.CLASS_TEXTS:
            raise ValueError(f"class text must be one of {sorted(self.CLASS_TEXTS)}, not {kind!r}")
        return [getattr(c, self.CLASS_TEXTS[kind]) for c in self.classes]

    def text_for(self, text: str, field: str = "prompt") -> str:
        """What the text encoder should embed: the class's prompt/description when `text` names a class, else `text`."""
        c = self.match(text)
        return getattr(c, field) if c is not None else text

    def __iter__(self):
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)
