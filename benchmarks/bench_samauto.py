"""SAMauto on the sample data: SAP-Net learned from 2 or 5 annotated slices segments the whole volume, then SAM
refines it; the paper's ablation (its Table 5) on our data.

    .venv/bin/python benchmarks/bench_samauto.py [--json out.json]

Structures: Colin27 T1 left thalamus (AAL 77) and left putamen (AAL 73), axial, all 181 slices. Training slices are
drawn as the paper does (normal around the median foreground slice, lib/sammed/samassist.py). Score: 3D Dice over
every slice of the volume except the annotated ones (those are the user's; counting them would flatter every row
equally). Rows:
- the coarse mask (SAP-Net alone): PANet on the frozen SAM features (cross-entropy, no position encoding), + the
  Fourier position encoding (the app's default), + the biased Dice loss (the paper's SAP-Net); then the paper's
  post-processing (top-K largest 3D components) on both, and the components anchored on the annotated slices (ours);
- SAMauto (on the app default's anchored coarse mask): SAM prompted with a box around each slice's coarse mask (vanilla LiteMedSAM, and with a box prompt
  encoder learned by SAMassist from the same slices), SAM's mask alone and averaged with SAP-Net's;
- the baseline: every slice gets the mask of the nearest annotated slice.
Times: SAP-Net training, and per slice at inference (the encoder once per slice, shared by both structures; the
coarse pass; the refinement of a slice with coarse foreground).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.cache import EmbeddingKey  # noqa: E402
from lib.core.evaluation import dice  # noqa: E402
from lib.sammed.auto_segment import AutoSegmentSettings, auto_segment  # noqa: E402
from lib.core.cache import LRUCache  # noqa: E402
from lib.core.predictor import ObjectMemory, PromptPredictor  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.sammed.samassist import PromptEncoderLearner, PromptLearningSettings, select_training_slices  # noqa: E402
from lib.sammed.sapnet import SAPNetLearner, SAPNetSettings, keep_largest_components, load_sapnet  # noqa: E402
from lib.core.transforms import Window, apply_intensity_range, compute_intensity_range, extract_slice  # noqa: E402
from lib.core.images import load_image  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
STRUCTURES = {"thalamus_L": 77, "putamen_L": 73}
DEFAULT = SAPNetSettings()  # what the app trains: cross-entropy, position encoding
PAPER = replace(DEFAULT, dice_weight=1.0)  # + the biased Dice (beta 2): the paper's SAP-Net
# The paper's Table 5 rows: what each adds to the one above (no post-processing yet).
ABLATION = {
    "PANet on SAM features (CE)": replace(DEFAULT, position_encoding=False),
    "+ position encoding (app default)": DEFAULT,
    "+ biased Dice (paper's SAP-Net)": PAPER,
}
COARSE = AutoSegmentSettings(refine="none")


def copy_nearest_annotation(truth: np.ndarray, train: list[int]) -> np.ndarray:
    return np.stack([truth[min(train, key=lambda t: abs(t - k))] for k in range(len(truth))])


def learn_box_prompt(model, slice_of, truth, train):
    learner = PromptEncoderLearner(model, torch.device("cpu"), PromptLearningSettings(prompt="boxes"))
    for k in train:
        learner.add_slice(slice_of(k), truth[k])
    encoder = copy.deepcopy(model.prompt_encoder)
    encoder.load_state_dict(learner.train().state_dict)
    return encoder.eval()


def run(model) -> tuple[list[dict], dict]:
    image = load_image(os.path.join(DATA, "colin27_t1.nii.gz"))
    labels = load_image(os.path.join(DATA, "labels", "final", "colin27_t1.nii.gz")).array[0].numpy().round()
    intensity = compute_intensity_range(image.array.numpy(), "MR")
    slice_of = lambda k: apply_intensity_range(extract_slice(image.array[:1], 2, k), intensity)
    num_slices = labels.shape[2]
    shape = tuple(extract_slice(image.array[:1], 2, 0).shape[-2:])
    # The infer task's embedding cache, large enough for the volume: each slice is encoded once.
    predictor = PromptPredictor(model, torch.device("cpu"), LRUCache(num_slices), ObjectMemory())
    embed = lambda k: predictor.embed(slice_of(k), Window.whole(shape), EmbeddingKey("colin27", axis=2, index=k))[0]
    start = time.perf_counter()
    for k in range(num_slices):
        embed(k)
    timing = {"encode_s_per_slice": round((time.perf_counter() - start) / num_slices, 3)}

    rows = []
    for name, value in STRUCTURES.items():
        volume = labels == value
        truth = np.stack([extract_slice(volume[None], 2, k)[0].numpy() for k in range(num_slices)])
        for n_slices in (2, 5):
            train = select_training_slices(volume, 2, n_slices, np.random.default_rng(0))
            held_out = np.setdiff1d(np.arange(num_slices), train)
            score = lambda predicted: round(dice(predicted[held_out], truth[held_out]), 3)
            annotated = {k: truth[k] for k in train}
            row = {"structure": name, "slices": n_slices, "train_slices": train}
            row["copy nearest annotated slice (baseline)"] = score(copy_nearest_annotation(truth, train))
            nets, coarse = {}, {}
            for label, settings in ABLATION.items():
                learner = SAPNetLearner(model, torch.device("cpu"), settings)
                for k in train:
                    learner.add_slice(slice_of(k), truth[k], index=k, embedding=embed(k))
                learned = learner.train()
                nets[settings] = net = load_sapnet(learned.state_dict, learned.info())
                unfiltered = replace(COARSE, top_k=num_slices * shape[0] * shape[1])
                start = time.perf_counter()
                coarse[settings] = auto_segment(model, net, embed, num_slices, shape, settings=unfiltered).coarse
                row[f"coarse: {label}"] = score(coarse[settings])
                if settings == DEFAULT:
                    row["train_s"] = round(learned.seconds, 1)
                    row["coarse_ms_per_slice"] = round(1000 * (time.perf_counter() - start) / num_slices, 1)
            row["coarse: paper's SAP-Net + top-K largest 3D components (paper's post-processing)"] = \
                score(keep_largest_components(coarse[PAPER], 1))
            row["coarse: app default + top-K largest 3D components"] = score(keep_largest_components(coarse[DEFAULT], 1))
            net = nets[DEFAULT]
            anchored = auto_segment(model, net, embed, num_slices, shape, settings=COARSE, annotated=annotated)
            row["coarse: app default + top-K anchored on the annotated slices (ours)"] = score(anchored.labels > 0)

            box_encoder = learn_box_prompt(model, slice_of, truth, train)
            for label, encoder, combine in (("SAM box (vanilla)", None, "sam"),
                                            ("SAM box (vanilla), mean with SAP-Net", None, "mean"),
                                            ("SAM box (learned box prompt)", box_encoder, "sam"),
                                            ("SAM box (learned box prompt), mean with SAP-Net", box_encoder, "mean")):
                settings = AutoSegmentSettings(refine="box", combine=combine)
                result = auto_segment(model, net, embed, num_slices, shape, prompt_encoder=encoder, settings=settings,
                                      annotated=annotated)
                row[f"SAMauto: {label}"] = score(result.labels > 0)
                refined = [s for s in result.slices if s["slice"] not in annotated]
                row["refine_ms_per_slice"] = round(1000 * result.seconds["refine"] / max(1, len(refined)), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows, timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows, timing = run(build_litemedsam().eval())
    columns = [f"{r['structure']}, {r['slices']} slices" for r in rows]
    methods = [k for k in rows[0] if k.startswith(("coarse:", "SAMauto:", "copy"))]
    print("\n3D Dice, unannotated slices of the whole volume\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for method in methods:
        print(f"| {method} | " + " | ".join(str(r[method]) for r in rows) + " |")
    print("\nSeconds (CPU)\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for key in ("train_s", "coarse_ms_per_slice", "refine_ms_per_slice"):
        print(f"| {key} | " + " | ".join(str(r[key]) for r in rows) + " |")
    print(f"\nencoder, s per slice (once per slice, shared by every structure): {timing['encode_s_per_slice']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "timing": timing}, f, indent=2)


if __name__ == "__main__":
    main()
