"""What a request's typed text asks TP-DRSeg for: one configured lesion class, free text, or every class.

TP-DRSeg (Li et al., MICCAI 2024) embeds each class's explicit written description rather than its bare name, so a
typed class name, abbreviation or synonym is mapped to its class (`LesionCatalogue.match`) and the model reads that
class's description; text that names no class is embedded as typed. Text with nothing to embed is refused with the
known classes, so that the user learns what to type instead of getting an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib.core.errors import bad_request

ALL_TEXTS = {"all", "*", "every", "everything", "every lesion", "every class", "all class", "all classes"}


@dataclass
class TextPrompt:
    mode: str  # "class", "free text" or "all"
    typed: str
    cls: Any = None  # LesionClass for mode "class"

    def describe(self) -> dict:
        if self.mode == "class":
            c = self.cls
            return {"mode": "class", "text": self.typed,
                    "matched": {"class": c.key, "name": c.name, "abbreviation": c.abbreviation, "label": c.label},
                    "embedded": c.prompt}
        if self.mode == "free text":
            return {"mode": "free text", "text": self.typed, "matched": None, "embedded": self.typed}
        return {"mode": "all", "text": self.typed, "matched": None}


def known_classes(catalogue) -> str:
    """"1 Microaneurysms (MA, or e.g. red dots)..." for error messages: name, abbreviation, two other synonyms."""
    from lib.tpdrseg.model.descriptions import normalise

    parts = []
    for c in catalogue:
        seen, examples = {normalise(c.name), normalise(c.abbreviation)}, []
        for s in c.synonyms:
            if normalise(s) not in seen and len(examples) < 2:
                seen.add(normalise(s))
                examples.append(s)
        also = f"; or e.g. {', '.join(examples)}" if examples else ""
        parts.append(f"{c.label} {c.name} ({c.abbreviation}{also})")
    return "; ".join(parts)


def parse_text(typed, catalogue) -> TextPrompt:
    """The prompt `typed` asks for: None, "all" and the like answer every class; 400 for empty or wordless text."""
    from lib.tpdrseg.model.descriptions import normalise

    if typed is None:
        return TextPrompt("all", "all")
    if isinstance(typed, (list, tuple)) and len(typed) == 1:
        typed = typed[0]
    if not isinstance(typed, str):
        raise bad_request(f"'text' must be a string, got {type(typed).__name__}; known classes: "
                          f"{known_classes(catalogue)}, or 'all'")
    raw = " ".join(typed.split())
    if not raw:
        raise bad_request(f"empty 'text': name a lesion class or describe one. Known classes: "
                          f"{known_classes(catalogue)}; or 'all' for every class")
    words = normalise(raw, drop_filler=False)
    if raw == "*" or words in ALL_TEXTS:
        return TextPrompt("all", raw)
    found = catalogue.match(raw)
    if found is not None:
        return TextPrompt("class", raw, found)
    if not normalise(raw):  # only filler words: "all lesions", "segment the lesions", "?"
        if {"all", "every", "everything"} & set(words.split()):
            return TextPrompt("all", raw)
        raise bad_request(f"'text' {raw!r} names no lesion and has nothing to embed. Known classes: "
                          f"{known_classes(catalogue)}; or 'all' for every class")
    return TextPrompt("free text", raw)
