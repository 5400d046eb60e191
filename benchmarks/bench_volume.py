"""Whole volumes, cold and warm, per encoder runtime in the same run: One-Prompt `segment` and SAMauto over 100
Colin27 axial slices (40-140), with each volume's Dice against AAL so that a faster runtime is also checked for
accuracy.

    .venv/bin/python benchmarks/bench_volume.py [--runtimes eager,openvino_bf16] [--json out.json]

One-Prompt: the served task (lib/oneprompt/infer.py) with a box template on the structure's largest slice, then
`segment` over the range: cold (no slice features cached; the runtime's graph already built, its export timed
apart) and warm (features cached). SAMauto: SAP-Net learned from 2 annotated slices (the app's default), then
auto_segment over the range (each slice encoded once, cold; then again with the embeddings cached). Dice: over the
range, the annotated slices excluded for SAMauto. Structures: held-out AAL ones for One-Prompt (templates never
trained on), SAMauto's README pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.backbone import SamEncoding  # noqa: E402
from lib.core.cache import EmbeddingKey, LRUCache  # noqa: E402
from lib.core.evaluation import dice  # noqa: E402
from lib.core.images import load_image  # noqa: E402
from lib.core.predictor import ObjectMemory, PromptPredictor  # noqa: E402
from lib.core.runtime import FrozenForward  # noqa: E402
from lib.core.transforms import Window, apply_intensity_range, compute_intensity_range, extract_slice  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.oneprompt.checkpoint import DEFAULT_WEIGHTS, load_oneprompt  # noqa: E402
from lib.oneprompt.infer import OnePromptInfer  # noqa: E402
from lib.oneprompt.templates import TemplateStore  # noqa: E402
from lib.sammed.auto_segment import auto_segment  # noqa: E402
from lib.sammed.samassist import select_training_slices  # noqa: E402
from lib.sammed.sapnet import SAPNetLearner, load_sapnet  # noqa: E402

SAMPLE = os.path.join(REPO, "sample-data")
IMAGE = os.path.join(SAMPLE, "colin27_t1.nii.gz")
SLICES = (40, 140)
ONEPROMPT_STRUCTURES = ("Putamen_L", "Hippocampus_L", "Insula_L")
SAMAUTO_STRUCTURES = ("Thalamus_L", "Putamen_L")


def labels_and_names():
    label = np.asarray(nib.load(os.path.join(SAMPLE, "labels", "final", "colin27_t1.nii.gz")).dataobj).round()
    with open(os.path.join(SAMPLE, "labels", "colin27_aal_names.json")) as f:
        values = {name: int(v) for v, name in json.load(f).items()}
    return label.astype(np.int32), values


def oneprompt(runtime: str, cache_dir: str, model, device: str = "cpu") -> dict:
    label, values = labels_and_names()
    lo, hi = SLICES
    out = {"structures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        task = OnePromptInfer(lambda device: model, TemplateStore(tmp), feature_cache_size=256, progress_every=1000,
                              encoder_runtime=runtime, runtime_cache_dir=cache_dir, device=device)
        start = time.perf_counter()
        task.encode_features(torch.zeros(1, 3, 256, 256, device=device))  # build (or load) the runtime's graph
        out["graph_s"] = round(time.perf_counter() - start, 1)
        for n, name in enumerate(ONEPROMPT_STRUCTURES):
            value = values[name]
            k = int(np.argmax((label == value).sum((0, 1))))
            i, j = np.nonzero(label[:, :, k] == value)
            task({"image": IMAGE, "mode": "register", "label": name,
                  "roi": [int(i.min()), int(i.max()), int(j.min()), int(j.max()), k, k]})
            if n == 0:  # cold: the template's slice is the only one encoded so far
                task.features.discard_where(lambda key: key[-1] != k)
            start = time.perf_counter()
            path, info = task({"image": IMAGE, "template": name, "slices": list(SLICES)})
            seconds = time.perf_counter() - start
            predicted = np.asarray(nib.load(path).dataobj)[:, :, lo:hi] > 0
            truth = label[:, :, lo:hi] == value
            row = {"dice": round(dice(predicted, truth), 4), "seconds": round(seconds, 1),
                   "encoder_runs": info.get("encoder_runs"), "labelled_slices": info["labelled_slices"]}
            if n == 0:
                row["cold"] = True
            out["structures"][name] = row
            print(runtime, "oneprompt", name, row, flush=True)
    first = out["structures"][ONEPROMPT_STRUCTURES[0]]
    out["cold_s"] = first["seconds"]
    out["warm_s"] = float(np.mean([r["seconds"] for r in list(out["structures"].values())[1:]]))
    out["mean_dice"] = round(float(np.mean([r["dice"] for r in out["structures"].values()])), 4)
    return out


def samauto(runtime: str, cache_dir: str, model, device: str = "cpu") -> dict:
    label, values = labels_and_names()
    image = load_image(IMAGE)
    intensity = compute_intensity_range(image.array.numpy(), "MR")
    slice_of = lambda k: apply_intensity_range(extract_slice(image.array[:1], 2, k), intensity)
    num_slices = label.shape[2]
    shape = tuple(extract_slice(image.array[:1], 2, 0).shape[-2:])
    encoder = FrozenForward(SamEncoding(model), runtime, cache_dir, name="litemedsam-encoder")
    start = time.perf_counter()
    encoder(torch.zeros(1, 3, 256, 256, device=device))
    out = {"graph_s": round(time.perf_counter() - start, 1), "structures": {}}
    predictor = PromptPredictor(model, torch.device(device), LRUCache(num_slices), ObjectMemory(), encode=encoder)
    embed = lambda k: predictor.embed(slice_of(k), Window.whole(shape), EmbeddingKey("colin27", axis=2, index=k))[0]
    lo, hi = SLICES
    for n, name in enumerate(SAMAUTO_STRUCTURES):
        volume = label == values[name]
        truth = np.stack([extract_slice(torch.as_tensor(volume[None]), 2, k)[0].numpy() for k in range(num_slices)])
        train = select_training_slices(volume, 2, 2, np.random.default_rng(0))
        learner = SAPNetLearner(model, torch.device(device))
        for k in train:
            learner.add_slice(slice_of(k), truth[k], index=k, embedding=embed(k))
        learned = learner.train()
        net = load_sapnet(learned.state_dict, learned.info())
        annotated = {k: truth[k] for k in train}
        start = time.perf_counter()
        result = auto_segment(model, net, embed, num_slices, shape, slice_range=SLICES, annotated=annotated)
        seconds = time.perf_counter() - start
        scored = [k for k in range(lo, hi) if k not in annotated]
        row = {"dice": round(dice(result.labels[scored] > 0, truth[scored]), 4), "seconds": round(seconds, 1),
               "cold": n == 0}
        out["structures"][name] = row
        print(runtime, "samauto", name, row, flush=True)
    rows = list(out["structures"].values())
    out["cold_s"], out["warm_s"] = rows[0]["seconds"], rows[1]["seconds"]
    out["mean_dice"] = round(float(np.mean([r["dice"] for r in rows])), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtimes", default="eager,openvino_bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-samauto", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"date": time.strftime("%Y-%m-%d"), "slices": list(SLICES), "threads": args.threads, "runtimes": {}}
    oneprompt_model = load_oneprompt(DEFAULT_WEIGHTS, torch.device("cpu"))
    sam = build_litemedsam().eval()
    with tempfile.TemporaryDirectory() as cache_dir:
        for runtime in args.runtimes.split(","):
            row = {"oneprompt": oneprompt(runtime, cache_dir, oneprompt_model)}
            if not args.skip_samauto:
                row["samauto"] = samauto(runtime, cache_dir, sam)
            report["runtimes"][runtime] = row
    print("| runtime | method | cold s | warm s | mean Dice |\n|---|---|---:|---:|---:|")
    for runtime, row in report["runtimes"].items():
        for method, r in row.items():
            print(f"| {runtime} | {method} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | {r['mean_dice']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
