"""Mask quality from simulated prompts on the sample data: the filled box vs LiteMedSAM on the whole slice vs
LiteMedSAM with AutoZoom, and one click. Prints per-target and mean Dice as a markdown table.

    .venv/bin/python benchmarks/eval_prompts.py [--runtime eager] [--json out.json]

--runtime: the image encoder's runtime (lib/core/runtime.py; default eager, the reference for the others).

Targets: AAL deep grey-matter structures on two axial Colin27 T1 slices (caudate, putamen, pallidum, thalamus,
hippocampus, amygdala: real anatomy with visible edges, unlike cortical parcels), the intracranial region of a
head-CT slice (a derived label), and real stardist nuclei (many small targets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.backbone import SamEncoding  # noqa: E402
from lib.core.cache import EmbeddingKey  # noqa: E402
from lib.core.runtime import RUNTIMES, FrozenForward  # noqa: E402
from lib.core.evaluation import evaluate_prompts, load_slice_targets  # noqa: E402
from lib.core.cache import LRUCache  # noqa: E402
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
DEEP_GREY = ("Caudate", "Putamen", "Pallidum", "Thalamus", "Hippocampus", "Amygdala")


def cases(max_nuclei: int = 12):
    with open(os.path.join(DATA, "labels", "colin27_aal_names.json")) as f:
        names = json.load(f)
    deep_grey = [int(k) for k, v in names.items() if v.startswith(DEEP_GREY)]
    colin, colin_label = os.path.join(DATA, "colin27_t1.nii.gz"), os.path.join(DATA, "labels/final/colin27_t1.nii.gz")
    yield (colin, colin_label, "MR", 2, 80, dict(values=deep_grey, min_area=30))
    yield (colin, colin_label, "MR", 2, 70, dict(values=deep_grey, min_area=30))
    yield (os.path.join(DATA, "head_ct.nii.gz"), os.path.join(DATA, "labels/final/head_ct.nii.gz"), "CT", 2, 20,
           dict(values=[2]))
    yield (os.path.join(DATA, "nuclei.png"), os.path.join(DATA, "labels/final/nuclei.png"), "MR", None, None,
           dict(binary=True, min_area=20, max_targets=max_nuclei))


def run(model, max_nuclei: int = 12, runtime: str = "eager") -> list[dict]:
    embeddings, objects = LRUCache(256), ObjectMemory()
    encode = FrozenForward(SamEncoding(model), runtime, name=runtime)
    predictor_for = lambda zoom: PromptPredictor(model, torch.device("cpu"), embeddings, objects,
                                                 PredictorSettings(zoom=zoom), encode=encode)
    rows = []
    for image, label, modality, axis, index, kwargs in cases(max_nuclei):
        slice_image, targets = load_slice_targets(image, label, modality, axis, index, **kwargs)
        rows += evaluate_prompts(predictor_for, slice_image, targets, axis, index,
                                 EmbeddingKey(image, axis=axis, index=index))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="eager", choices=RUNTIMES)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = run(build_litemedsam().eval(), runtime=args.runtime)
    keys = ("filled_box", "box_whole_slice", "box_zoom", "click")
    print("| target | area (px) | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['target']} | {r['area']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    small = [r for r in rows if r["area"] < 300]
    for title, subset in (("mean", rows), ("mean, area < 300 px", small)):
        print(f"| **{title}** ({len(subset)}) | | " + " | ".join(f"**{np.mean([r[k] for r in subset]):.3f}**" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
