"""Where a frozen encoder's forward pass runs: eager PyTorch, PyTorch with bf16 autocast, or an OpenVINO graph.

Every whole-volume feature pays one image-encoder run per slice, so the runtime of the frozen encoders is the
app's speed. Measured on this project's 2-core CPU (README, `benchmarks/bench_models.py`): OpenVINO in bf16 runs
the LiteMedSAM encoder in about half the time of eager PyTorch, PyTorch's own bf16 autocast a little slower than
that, and OpenVINO in fp32 no faster than eager; bf16 moved no mean Dice on the real targets by more than 0.01.
`auto` therefore takes OpenVINO bf16 on a CPU (PyTorch bf16 when OpenVINO is not installed) and eager PyTorch on
CUDA, where neither measurement applies.

An OpenVINO graph is exported once per module weights and input shape (torch.export, then OpenVINO's converter:
~10 s) and kept under the cache folder, keyed by a hash of the weights, so a later start only compiles it (~1 s).
It is built at the first call, never at app start. Only frozen modules go through here: training needs eager
autograd, and a module whose weights change must be given a new `FrozenForward`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "torch_bf16", "openvino_fp32", "openvino_bf16")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(requested: str | None, device: torch.device) -> str:
    """The runtime to use for `requested` (a setting: auto or one of RUNTIMES) on `device`."""
    requested = (requested or "auto").strip().lower()
    if requested != "auto" and requested not in RUNTIMES:
        raise ValueError(f"encoder_runtime must be auto or one of {', '.join(RUNTIMES)}, got {requested!r}")
    if device.type != "cpu":
        if requested not in ("auto", "eager"):
            logger.warning(f"encoder_runtime {requested} is for CPUs: eager PyTorch on {device}")
        return "eager"
    if requested == "auto":
        return "openvino_bf16" if openvino_available() else "torch_bf16"
    if requested.startswith("openvino") and not openvino_available():
        logger.warning(f"encoder_runtime {requested}: openvino is not installed, using torch_bf16")
        return "torch_bf16"
    return requested


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _Flat(nn.Module):
    """A module's output as a tuple (a graph has outputs, not dict keys): the tensor, or the dict's values in
    `keys` order."""

    def __init__(self, module: nn.Module, keys: list[str] | None):
        super().__init__()
        self.module, self.keys = module, keys

    def forward(self, x):
        out = self.module(x)
        return (out,) if self.keys is None else tuple(out[k] for k in self.keys)


class FrozenForward:
    """`module(x)` of a frozen module (its output a tensor or a dict of tensors) through one runtime.

    cache_dir: where OpenVINO graphs are kept (None: built in memory at each start). name: for the log. Thread-safe: one OpenVINO inference at a time per input shape (the server
    gives the device to one request at a time anyway)."""

    def __init__(self, module: nn.Module, runtime: str, cache_dir: str | None = None, name: str = "encoder"):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}")
        self.module, self.runtime, self.cache_dir, self.name = module, runtime, cache_dir, name
        self._graphs: dict[tuple, tuple[Callable, threading.Lock, list | None]] = {}
        self._lock = threading.Lock()
        self.export_seconds: dict[str, float] = {}

    def __call__(self, x: torch.Tensor):
        if self.runtime == "eager":
            return self.module(x)
        if self.runtime == "torch_bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.module(x)
            return {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()
        graph = self._graph(tuple(x.shape))
        if graph is None:  # this module could not be exported: eager PyTorch, as said in the log
            return self.module(x)
        infer, lock, keys = graph
        with lock:
            outputs = infer(x.detach().cpu().float().contiguous().numpy())
        tensors = [torch.from_numpy(o).to(x.device) for o in outputs]
        return tensors[0] if keys is None else dict(zip(keys, tensors))

    def info(self) -> dict:
        return {"runtime": self.runtime, "graphs": [list(s) for s, g in self._graphs.items() if g is not None],
                "eager_fallback": [list(s) for s, g in self._graphs.items() if g is None],
                "export_s": {k: round(v, 1) for k, v in self.export_seconds.items()}}

    # -- OpenVINO --------------------------------------------------------------------------------------------
    def _graph(self, shape: tuple):
        with self._lock:
            if shape not in self._graphs:
                try:
                    self._graphs[shape] = self._compile(shape)
                except Exception as e:  # noqa: BLE001 - any exporter or compiler failure: serve eager, never fail
                    logger.warning(f"{self.name}: no OpenVINO graph for {shape} ({type(e).__name__}: {e}); "
                                   f"running eager PyTorch for it")
                    self._graphs[shape] = None
            return self._graphs[shape]

    def _compile(self, shape: tuple):
        import openvino as ov

        core = ov.Core()
        model, keys = self._load_or_export(shape, ov)
        precision = "bf16" if self.runtime == "openvino_bf16" else "f32"
        start = time.perf_counter()
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())})
        request = compiled.create_infer_request()
        count = len(compiled.outputs)
        logger.info(f"{self.name}: OpenVINO {precision} graph for {shape} compiled in "
                    f"{time.perf_counter() - start:.1f}s")

        def infer(array):
            request.infer({0: array})
            # Copies: the request reuses its output buffers at the next call.
            return [request.get_output_tensor(i).data.copy() for i in range(count)]
        return infer, threading.Lock(), keys

    def _load_or_export(self, shape: tuple, ov):
        stem = None
        if self.cache_dir:
            # Keyed by what the graph computes, not by who asks: the infer task and a training run share it.
            key = hashlib.sha256(f"{type(self.module).__qualname__}|{weights_digest(self.module)}|{shape}|"
                                 f"{torch.__version__}|{ov.__version__}".encode()).hexdigest()[:20]
            stem = os.path.join(self.cache_dir, f"{type(self.module).__name__}-{'x'.join(map(str, shape))}-{key}")
            if os.path.exists(stem + ".json"):  # written last: the graph beside it is whole
                with open(stem + ".json") as f:
                    keys = json.load(f)["keys"]
                try:
                    return ov.Core().read_model(stem + ".xml"), keys
                except Exception as e:  # a damaged cache is rebuilt, not fatal
                    logger.warning(f"{self.name}: cached graph {stem}.xml unreadable ({e}); exporting again")
        start = time.perf_counter()
        example = torch.zeros(shape, dtype=torch.float32, device=next(self.module.parameters()).device)
        with torch.no_grad():
            out = self.module(example)
            keys = list(out) if isinstance(out, dict) else None
            exported = torch.export.export(_Flat(self.module, keys).eval(), (example,))
        model = ov.convert_model(exported)
        self.export_seconds["x".join(map(str, shape))] = time.perf_counter() - start
        logger.info(f"{self.name}: exported the OpenVINO graph for {shape} in {time.perf_counter() - start:.1f}s")
        if stem:
            self._save(model, keys, stem, ov)
        return model, keys

    @staticmethod
    def _save(model, keys, stem: str, ov) -> None:
        """Graph, weights, then the JSON that marks them whole; each moved into place from a temporary folder."""
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(stem), prefix=".export-")
        try:
            ov.save_model(model, os.path.join(tmp, "g.xml"), compress_to_fp16=False)
            with open(os.path.join(tmp, "g.json"), "w") as f:
                json.dump({"keys": keys}, f)
            for ext in (".bin", ".xml", ".json"):
                os.replace(os.path.join(tmp, "g" + ext), stem + ext)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
