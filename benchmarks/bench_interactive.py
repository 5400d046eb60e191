"""First clicks and corrections under the CVPR 2025 interactive-segmentation protocol, on held-out targets.

    .venv/bin/python benchmarks/bench_interactive.py [--sets heldout|training|all] [--methods ...] [--json out.json]

Each target gets two sessions, as the challenge simulates its users: a first prompt (one click at the target's
most interior pixel, or its tight box), then 5 corrective clicks, each at the distance-transform centre of the
largest error region (foreground for missed tissue, background for extra), all clicks kept. Reported per method:
the Dice after each step, the DSC AUC (normalised to [0, 1]), how often a step lowered the Dice, and the
oversized rate: first clicks whose mask exceeds 5x the target's area (an organ returned for a lesion).

Methods (the served code paths, in process, on the same cached embeddings):
- `box_search`: vanilla LiteMedSAM, a click answered by the 5-box search (the candidate with the best predicted
  IoU), a box as it was trained on; corrective clicks applied to its mask (PromptPredictor._respect_clicks);
- `click_model`: the shipped click model (lib/sammed/weights/click_prompt_encoder.pt) answers every session that
  starts with a click, on every kind of image; a box and its corrections as `box_search`;
- `served`: what `litemedsam` answers a label nobody has taught: the click model on the kinds of image it lists
  (MR volumes), the box search elsewhere; a box and its corrections as `box_search`.

Target sets (`--sets`; the click model never trained on a held-out one):
- `colin27_heldout` (MR): AAL's held-out structures (putamen, hippocampus, insula, precuneus, cerebellum 6, vermis
  4-5; both sides), 3 axial slices each through the middle of its extent, the largest cross-section;
- `head_ct_intracranial` (CT, held out): the intracranial region, derived by thresholds, 4 axial slices;
- `nuclei` (fluorescence microscopy, held out): 16 real DSB nuclei spread over sizes;
- `fundus_lesions_SYNTHETIC` (colour fundus, held out): painted haemorrhages and exudates on a real photograph;
- `colin27_training` (MR): caudate, pallidum, thalamus, amygdala (the click model trained on them: not held out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.backbone import SamEncoding  # noqa: E402
from lib.core.cache import EmbeddingKey, LRUCache  # noqa: E402
from lib.core.evaluation import (box_prompt, click_prompt, component_targets, corrective_session,  # noqa: E402
                                 dsc_auc)
from lib.core.images import load_image  # noqa: E402
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor  # noqa: E402
from lib.core.runtime import RUNTIMES, FrozenForward  # noqa: E402
from lib.core.transforms import extract_slice  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.sammed.click_model import WEIGHTS, load_click_model, served_image_kinds  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
HELDOUT_AAL = ("Putamen", "Hippocampus", "Insula", "Precuneus", "Cerebelum_6", "Vermis_4_5")
TRAINING_AAL = ("Caudate", "Pallidum", "Thalamus", "Amygdala")
HELDOUT_SETS = ("colin27_heldout", "head_ct_intracranial", "nuclei", "fundus_lesions_SYNTHETIC")
OVERSIZED = 5.0  # a first-click mask larger than this many times its target's area
STEPS = 6  # the first prompt + 5 corrective clicks


class Case:
    """One slice and its targets: the normalised (C, H, W) slice, the targets' masks, where it is."""

    def __init__(self, dataset, modality, slice_image, targets, axis, index, key):
        self.dataset, self.modality, self.slice_image = dataset, modality, slice_image
        self.targets, self.axis, self.index, self.key = targets, axis, index, key


def _load(name, modality, ct_window=None):
    image = load_image(os.path.join(DATA, name))
    label = load_image(os.path.join(DATA, "labels", "final", name))
    range_key, intensity = image.intensity(modality, ct_window)
    return image, label, range_key, intensity


def colin27_cases(families, dataset, slices_per_structure=3, min_area=30):
    with open(os.path.join(DATA, "labels", "colin27_aal_names.json")) as f:
        names = {int(k): v for k, v in json.load(f).items()}
    image, label, range_key, intensity = _load("colin27_t1.nii.gz", "MR")
    volume = label.array[0].numpy().round().astype(int)
    label_slice = lambda k: extract_slice(label.array[:1], 2, k)[0].numpy().round().astype(int)
    for value, name in sorted(names.items()):
        if not name.startswith(families):
            continue
        present = np.nonzero((volume == value).any(axis=(0, 1)))[0]
        if len(present) == 0:
            continue
        lo, hi = present[0] + 0.2 * (present[-1] - present[0]), present[0] + 0.8 * (present[-1] - present[0])
        for k in np.linspace(lo, hi, slices_per_structure).round().astype(int):
            targets = component_targets(label_slice(k), [value], min_area=min_area, name=f"{name}@k{k}:")[:1]
            if targets:
                yield Case(dataset, "MR", image.normalised_slice(2, int(k), intensity), targets, 2, int(k),
                           EmbeddingKey(image.fingerprint, range_key, 2, int(k)))


def head_ct_cases():
    image, label, range_key, intensity = _load("head_ct.nii.gz", "CT")
    for k in (10, 22, 34, 46):
        targets = component_targets(extract_slice(label.array[:1], 2, k)[0].numpy().round().astype(int), [2], min_area=100, name=f"intracranial@k{k}:")[:1]
        yield Case("head_ct_intracranial", "CT", image.normalised_slice(2, k, intensity), targets, 2, k,
                   EmbeddingKey(image.fingerprint, range_key, 2, k))


def image_2d_case(name, dataset, modality, binary, min_area, max_targets):
    image, label, range_key, intensity = _load(name, modality)
    label2d = extract_slice(label.array[:1], None, 0)[0].numpy().round().astype(int)
    if binary:
        targets = component_targets((label2d > 0).astype(int), [1], min_area=min_area, name=f"{dataset}:")
    else:
        # Instance-like: every connected component of every class is its own target.
        targets = component_targets(label2d, None, min_area=min_area, name=f"{dataset}:")
    if len(targets) > max_targets:
        targets = [targets[i] for i in np.linspace(0, len(targets) - 1, max_targets).round().astype(int)]
    yield Case(dataset, modality, image.normalised_slice(None, 0, intensity), targets, None, None,
               EmbeddingKey(image.fingerprint, range_key))


def cases(sets):
    makers = {
        "colin27_heldout": lambda: colin27_cases(HELDOUT_AAL, "colin27_heldout"),
        "head_ct_intracranial": head_ct_cases,
        "nuclei": lambda: image_2d_case("nuclei.png", "nuclei", "MR", True, 20, 16),
        "fundus_lesions_SYNTHETIC": lambda: image_2d_case("fundus_synthetic_lesions.png", "fundus_lesions_SYNTHETIC",
                                                          "RGB", False, 20, 12),
        "colin27_training": lambda: colin27_cases(TRAINING_AAL, "colin27_training"),
    }
    for name in sets:
        yield from makers[name]()


class Method:
    """A served path: `predict(case, prompt) -> mask`, with a fresh object memory per session."""

    def __init__(self, name, model, encode, embeddings, settings, prompt_encoder=None, click_image_kinds=None):
        self.name = name
        self.click_image_kinds = click_image_kinds  # None: prompt_encoder answers every kind of image
        self.predictor = PromptPredictor(model, torch.device("cpu"), embeddings, ObjectMemory(), settings,
                                         encode=encode)
        self.prompt_encoder = prompt_encoder  # answers clicks without a box, when given

    def new_session(self):
        self.predictor.objects = ObjectMemory()

    def predict(self, case, prompt):
        kind = f"{case.modality}/{'2D' if case.axis is None else '3D'}"  # lib.core.images.image_kind
        answers = self.click_image_kinds is None or kind in self.click_image_kinds
        encoder = self.prompt_encoder if prompt.box is None and answers else None
        return self.predictor.predict(case.slice_image, prompt, case.key, encoder)[0]


def run(sets, methods, runtime="eager", click_model_path=None):
    model = build_litemedsam().eval()
    encode = FrozenForward(SamEncoding(model), runtime, name=runtime)
    embeddings = LRUCache(512)
    click_model = load_click_model(model.prompt_encoder, click_model_path) if click_model_path else None
    click_kinds = served_image_kinds(torch.load(click_model_path, weights_only=True)) if click_model else ()
    available = {
        "box_search": lambda: Method("box_search", model, encode, embeddings, PredictorSettings()),
        "click_model": lambda: Method("click_model", model, encode, embeddings, PredictorSettings(), click_model),
        "served": lambda: Method("served", model, encode, embeddings, PredictorSettings(), click_model,
                                 click_image_kinds=click_kinds),
    }
    chosen = [available[m]() for m in methods if m != "click_model" or click_model is not None]
    rows = []
    for case in cases(sets):
        for target in case.targets:
            for method in chosen:
                row = {"dataset": case.dataset, "target": target.name, "area": int(target.mask.sum()),
                       "method": method.name}
                for kind, first in (("click", click_prompt(target, case.axis, case.index)),
                                    ("box", box_prompt(target, case.axis, case.index))):
                    method.new_session()
                    first_mask = {}

                    def predict(prompt):
                        mask = method.predict(case, prompt)
                        first_mask.setdefault("mask", mask)
                        return mask

                    scores = corrective_session(predict, target, first, max_clicks=STEPS - 1)
                    row[kind] = [round(s, 4) for s in scores]
                    row[f"{kind}_auc"] = round(dsc_auc(scores), 4)
                    row[f"{kind}_area_ratio"] = round(float(first_mask["mask"].sum()) / row["area"], 3)
                rows.append(row)
    return rows


def summary(rows):
    """Mean per (dataset, method) and over the held-out sets."""
    out = []
    groups = sorted({(r["dataset"], r["method"]) for r in rows})
    for dataset in sorted({d for d, _ in groups}) + ["HELD-OUT MEAN"]:
        for method in sorted({m for _, m in groups}, key=lambda m: [r["method"] for r in rows].index(m)):
            sel = [r for r in rows if r["method"] == method
                   and (r["dataset"] == dataset or (dataset == "HELD-OUT MEAN" and r["dataset"] in HELDOUT_SETS))]
            if not sel:
                continue
            click = np.mean([r["click"] for r in sel], axis=0)
            box = np.mean([r["box"] for r in sel], axis=0)
            falls = [np.diff(r[k]) < -1e-6 for r in sel for k in ("click", "box")]
            out.append({
                "dataset": dataset, "method": method, "targets": len(sel),
                "click": [round(float(v), 4) for v in click], "box": [round(float(v), 4) for v in box],
                "click_auc": round(float(np.mean([r["click_auc"] for r in sel])), 4),
                "box_auc": round(float(np.mean([r["box_auc"] for r in sel])), 4),
                "oversized_rate": round(float(np.mean([r["click_area_ratio"] > OVERSIZED for r in sel])), 4),
                "falls_per_session": round(float(np.mean([f.sum() for f in falls])), 3),
                "mean_fall": round(float(np.mean([min(0.0, float(np.diff(r[k]).min())) for r in sel
                                                  for k in ("click", "box")])), 4),
            })
    return out


def print_table(summary_rows):
    print("| set | method | n | 1 click | click +5 | click AUC | oversized | box | box +1 | box +5 | box AUC | falls/session |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary_rows:
        print(f"| {s['dataset']} | {s['method']} | {s['targets']} | {s['click'][0]:.3f} | {s['click'][-1]:.3f} | "
              f"{s['click_auc']:.3f} | {100 * s['oversized_rate']:.0f}% | {s['box'][0]:.3f} | {s['box'][1]:.3f} | "
              f"{s['box'][-1]:.3f} | {s['box_auc']:.3f} | {s['falls_per_session']:.2f} |")


def plot(summary_rows, path):
    """Dice against interaction step, held-out mean, one line per method and first prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("click", "box")):
        for s in summary_rows:
            if s["dataset"] == "HELD-OUT MEAN":
                ax.plot(range(STEPS), s[kind], marker="o", label=f"{s['method']} (AUC {s[kind + '_auc']:.3f})")
        ax.set_title(f"first prompt: {'one click' if kind == 'click' else 'a tight box'}, then corrective clicks")
        ax.set_xlabel("interaction step (0 = first prompt)")
        ax.set_xticks(range(STEPS))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("mean Dice, held-out targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="heldout", help="heldout, training, all, or a comma list of set names")
    parser.add_argument("--methods", default="box_search,click_model,served")
    parser.add_argument("--click-model", default=WEIGHTS)
    parser.add_argument("--runtime", default="eager", choices=RUNTIMES)
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write Dice against interaction step (PNG)")
    args = parser.parse_args()
    sets = {"heldout": list(HELDOUT_SETS), "training": ["colin27_training"],
            "all": list(HELDOUT_SETS) + ["colin27_training"]}.get(args.sets, args.sets.split(","))
    start = time.perf_counter()
    rows = run(sets, args.methods.split(","), args.runtime, args.click_model)
    summary_rows = summary(rows)
    print_table(summary_rows)
    print(f"\n{len(rows)} target x method rows in {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(summary_rows, args.plot)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"sets": sets, "summary": summary_rows, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
