"""Train the shipped click model (lib/sammed/click_model.py) on the sample data's training structures.

    .venv/bin/python scripts/train_click_model.py [--steps 1200] [--out lib/sammed/weights/click_prompt_encoder.pt]

What it learns from (all real labels; held-out targets are never seen, so benchmarks/bench_interactive.py can
measure it on them):
- Colin27 T1 + AAL, the structures outside One-Prompt's held-out AAL families (putamen, hippocampus, insula,
  precuneus, cerebellum 6, vermis 4-5: lib/oneprompt/dataset.py), on axial, coronal and sagittal slices; every
  connected component of at least 20 pixels is a target;
- the head CT's bone (the intracranial region is held out).
Held out as whole modalities: the nuclei (microscopy) and the fundus photographs.
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

from lib.core.evaluation import component_targets  # noqa: E402
from lib.core.images import load_image  # noqa: E402
from lib.core.stores import atomic_write  # noqa: E402
from lib.core.transforms import extract_slice  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.oneprompt.dataset import HELDOUT_AAL  # noqa: E402
from lib.sammed.click_model import WEIGHTS, ClickModelLearner, ClickTrainingSettings  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
MAX_TARGETS_PER_SLICE = 24


def training_slices(rng: np.random.Generator):
    """(name, normalised slice, [target masks]) for every training slice."""
    with open(os.path.join(DATA, "labels", "colin27_aal_names.json")) as f:
        names = {int(k): v for k, v in json.load(f).items()}
    training_values = [v for v, name in names.items() if not name.startswith(HELDOUT_AAL)]
    plans = [("colin27_t1.nii.gz", "MR", None, training_values, {2: range(15, 166, 3), 1: range(20, 200, 5),
                                                                0: range(20, 165, 5)}),
             ("head_ct.nii.gz", "CT", None, [1], {2: range(0, 60, 3)})]
    for name, modality, window, values, axes in plans:
        image, label = load_image(os.path.join(DATA, name)), load_image(os.path.join(DATA, "labels", "final", name))
        _, intensity = image.intensity(modality, window)
        for axis, indices in axes.items():
            for index in indices:
                label_slice = extract_slice(label.array[:1], axis, index)[0].numpy().round().astype(int)
                present = [v for v in values if (label_slice == v).any()]
                targets = component_targets(label_slice, present, min_area=20) if present else []
                if len(targets) > MAX_TARGETS_PER_SLICE:
                    targets = [targets[i] for i in rng.choice(len(targets), MAX_TARGETS_PER_SLICE, replace=False)]
                if targets:
                    yield f"{name}:{axis}:{index}", image.normalised_slice(axis, index, intensity), [t.mask for t in targets]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=ClickTrainingSettings.steps)
    parser.add_argument("--learning-rate", type=float, default=ClickTrainingSettings.learning_rate)
    parser.add_argument("--slices-per-step", type=int, default=ClickTrainingSettings.slices_per_step)
    parser.add_argument("--targets-per-slice", type=int, default=ClickTrainingSettings.targets_per_slice)
    parser.add_argument("--out", default=WEIGHTS)
    parser.add_argument("--image-kinds", default="MR/3D",
                        help="the kinds of image (modality/dimensions) whose clicks it answers: where "
                             "benchmarks/bench_interactive.py measured it better than the box search (comma list)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_litemedsam().eval()
    learner = ClickModelLearner(model, torch.device("cpu"),
                                ClickTrainingSettings(steps=args.steps, learning_rate=args.learning_rate,
                                                      slices_per_step=args.slices_per_step,
                                                      targets_per_slice=args.targets_per_slice))
    start = time.perf_counter()
    names = []
    for name, slice_image, masks in training_slices(np.random.default_rng(0)):
        learner.add_slice(slice_image, masks)
        names.append(name)
    encode_s = time.perf_counter() - start
    print(f"encoded {len(learner.slices)} slices ({sum(len(s.targets) for s in learner.slices)} targets) "
          f"in {encode_s:.0f} s", flush=True)

    def progress(step, total, loss):
        if step % 50 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    result = learner.train(progress)
    result.update(image_kinds=[m for m in args.image_kinds.split(",") if m], encode_seconds=round(encode_s, 1), command="scripts/train_click_model.py " + " ".join(sys.argv[1:]),
                  trained_on=["colin27_t1 AAL outside the held-out families (axes 0, 1, 2)", "head_ct bone"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result["losses"] = [round(v, 5) for v in result["losses"]]
    atomic_write(args.out, lambda f: torch.save(result, f))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
