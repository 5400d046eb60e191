"""Reading weight files without the packages that usually read them (no `safetensors`, `transformers`, `open_clip`).

* `read_safetensors`: the safetensors format is an 8-byte little-endian header length, a JSON header
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (offsets relative to the end of the header) and the raw
  little-endian tensor bytes. Read with numpy, copied into torch tensors.
* `read_state_dict`: `.safetensors`, or anything `torch.load` reads: a plain state dict, a checkpoint holding one under
  `state_dict` / `model` / `module`, or a TorchScript archive (OpenAI's `ViT-B-16.pt`), whose parameters and buffers
  are read from the scripted module (`torch.jit.load(..., map_location="cpu")`).
* `packaged_file`: the path of a data file inside an installed distribution, found through `importlib.metadata`, so
  the distribution's Python package is never imported (those weight packages import sentence-transformers /
  torchvision when imported).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import torch

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Every tensor of a `.safetensors` file as a CPU torch tensor (BF16 is widened to float32)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out: Dict[str, torch.Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            raw = f.read(end - begin)
            if info["dtype"] == "BF16":
                arr = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                t = torch.from_numpy(arr.view(np.float32).copy())
            else:
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
                arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
                t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
            out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors in the safetensors layout (used by tests to make files in the upstream layouts)."""
    names = {np.float64: "F64", np.float32: "F32", np.float16: "F16", np.int64: "I64", np.int32: "I32",
             np.int16: "I16", np.int8: "I8", np.uint8: "U8", np.bool_: "BOOL"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        arr = t.detach().cpu().contiguous().numpy()
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[arr.dtype.type], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a safetensors file, a torch checkpoint or a TorchScript archive."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        if scripted:
            module = torch.jit.load(str(path), map_location="cpu")
            return {k: v.detach().float() if v.is_floating_point() else v.detach()
                    for k, v in module.state_dict().items()}
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict (got {type(obj).__name__})")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def packaged_file(distribution: str, relative: str) -> Optional[Path]:
    """`<site-packages>/<relative>` of an installed distribution, or None when it is not installed / lacks the file."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None
