"""What was learned for each (model, label), on disk: written atomically, read again when it changes.

Layout: <root>/<label>.pt (the main weights: a learned prompt encoder for SAMassist, the adapters for MSA),
<root>/<label>.<artifact>.pt for others learned with it (e.g. SAMauto's SAP-Net) and <root>/<label>.json (what
was learned: prompt type, slices, seconds, validation Dice...), written last. The infer tasks ask for a label's
weights on every request; a new training result is therefore served at the next click, without a restart.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading

import torch

from lib.core.errors import RequestError


class UnusableName(RequestError, ValueError):
    """A label that leaves nothing for a file name (":", "..."): the client's to change, hence a 400."""


def safe_name(label: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._")
    if not name:
        raise UnusableName(400, f"label {str(label)[:80]!r} gives no usable name: use letters or digits")
    return name


def atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class LabelStore:
    def __init__(self, root: str):
        self.root = root
        self._loaded: dict[str, tuple[int, torch.nn.Module]] = {}
        self._lock = threading.Lock()

    def paths(self, label: str, artifact: str = "main") -> tuple[str, str]:
        base = os.path.join(self.root, safe_name(label))
        return base + (".pt" if artifact == "main" else f".{artifact}.pt"), base + ".json"

    def save(self, label: str, state_dict: dict, info: dict, extra: dict | None = None) -> None:
        """The main weights, other artifacts' (name -> state dict, e.g. "sapnet"), then the info."""
        os.makedirs(self.root, exist_ok=True)
        for artifact, state in {"main": state_dict, **(extra or {})}.items():
            atomic_write(self.paths(label, artifact)[0], lambda f: torch.save(state, f))
        atomic_write(self.paths(label)[1], lambda f: f.write(json.dumps({"label": label, **info}, indent=2).encode()))

    def info(self) -> dict:
        """label -> what was learned, for every stored label."""
        out = {}
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                if name.endswith(".json") and not name.startswith(".tmp_"):
                    with open(os.path.join(self.root, name)) as f:
                        meta = json.load(f)
                    out[meta.get("label", name[:-5])] = meta
        return out

    def meta(self, label: str) -> dict | None:
        """What was learned for one label (its .json), or None: one small read, for the request path."""
        try:
            with open(self.paths(label)[1]) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):  # absent, bad name, or being replaced
            return None

    def stamp(self, label: str, artifact: str = "main") -> int | None:
        """The artifact file's modification time (ns), which changes with every training result; None if absent."""
        try:
            return os.stat(self.paths(label, artifact)[0]).st_mtime_ns
        except FileNotFoundError:
            return None

    def load(self, label: str | None, artifact: str, build, device):
        """build(state_dict) for a label's stored artifact, rebuilt only when its file changed; None if absent."""
        if not label:
            return None
        weights, _ = self.paths(label, artifact)
        try:
            stamp = os.stat(weights).st_mtime_ns
        except FileNotFoundError:
            return None
        with self._lock:
            cached = self._loaded.get((label, artifact))
            if cached and cached[0] == stamp:
                return cached[1]
            value = build(torch.load(weights, map_location=device, weights_only=True))
            self._loaded[(label, artifact)] = (stamp, value)
            return value
