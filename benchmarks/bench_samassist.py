"""SAMassist on the sample data: learn the prompt encoder from 2 or 5 annotated slices, then segment held-out
slices with n random clicks (n foreground + n background, as the paper samples them) or a jittered box.

    .venv/bin/python benchmarks/bench_samassist.py [--json out.json]

Structures: Colin27 T1 left thalamus (AAL 77) and left putamen (AAL 73), axial. Training slices are drawn as the
paper does (normal around the median foreground slice); every other foreground slice is held out. Also shown:
the app's click without learning (box search, lib/core/predictor.py) for one click.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.cache import EmbeddingKey  # noqa: E402
from lib.core.evaluation import Target, click_prompt, dice, jitter_box, validate_prompts  # noqa: E402
from lib.core.cache import LRUCache  # noqa: E402
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.sammed.samassist import (PromptEncoderLearner, PromptLearningSettings, sample_points,  # noqa: E402
                                    select_training_slices)
from lib.core.transforms import (ModelFrame, Window, apply_intensity_range, compute_intensity_range, extract_slice,  # noqa: E402
                            resize_to_model)
from lib.core.images import load_image  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
STRUCTURES = {"thalamus_L": 77, "putamen_L": 73}
CLICKS = (1, 3, 5)


def run(model) -> list[dict]:
    image = load_image(os.path.join(DATA, "colin27_t1.nii.gz"))
    labels = load_image(os.path.join(DATA, "labels", "final", "colin27_t1.nii.gz")).array[0].numpy().round()
    intensity = compute_intensity_range(image.array.numpy(), "MR")
    slice_of = lambda k: apply_intensity_range(extract_slice(image.array[:1], 2, k), intensity)
    rows = []
    for name, value in STRUCTURES.items():
        volume = labels == value
        mask_of = lambda k: extract_slice(torch.as_tensor(volume[None].astype(np.float32)), 2, k)[0].numpy() > 0
        for n_slices in (2, 5):
            rng = np.random.default_rng(0)
            train = select_training_slices(volume, 2, n_slices, rng)
            encoders, seconds = {}, {}
            for prompt in ("points", "boxes"):
                learner = PromptEncoderLearner(model, torch.device("cpu"), PromptLearningSettings(prompt=prompt))
                start = time.perf_counter()
                for k in train:
                    learner.add_slice(slice_of(k), mask_of(k))
                learned = learner.train()
                seconds[prompt] = time.perf_counter() - start
                encoder = copy.deepcopy(model.prompt_encoder)
                encoder.load_state_dict(learned.state_dict)
                encoders[prompt] = encoder.eval()
            held_out = [k for k in range(volume.shape[2]) if mask_of(k).sum() >= 30 and k not in train][::2]
            scores: dict[str, list] = {}
            predictor = PromptPredictor(model, torch.device("cpu"), LRUCache(4), ObjectMemory(), PredictorSettings())
            for k in held_out:
                mask, image_slice = mask_of(k), slice_of(k)
                frame = ModelFrame(Window.whole(mask.shape), model.image_size)
                with torch.inference_mode():
                    embedding = model.encode(resize_to_model(image_slice, frame).expand(3, -1, -1)[None])
                prng = np.random.default_rng(k)
                for n in CLICKS:
                    points = np.concatenate([sample_points(mask, n, "uniform", prng), sample_points(~mask, n, "uniform", prng)])
                    coords = torch.as_tensor(frame.points_to_model(points))[None]
                    labels_t = torch.as_tensor([[1] * n + [0] * n])
                    for which, encoder in (("vanilla", None), ("learned", encoders["points"])):
                        with torch.inference_mode():
                            logits, _ = model.decode(embedding, point_coords=coords, point_labels=labels_t,
                                                     prompt_encoder=encoder)
                        pred = frame.mask_on_slice(logits[0, 0], mask.shape)
                        scores.setdefault(f"{which} {n} click(s)", []).append(dice(pred, mask))
                box = torch.as_tensor(frame.box_to_model(jitter_box(mask, 5, 10, prng)))[None]
                for which, encoder in (("vanilla", None), ("learned", encoders["boxes"])):
                    with torch.inference_mode():
                        logits, _ = model.decode(embedding, boxes=box, prompt_encoder=encoder)
                    pred = frame.mask_on_slice(logits[0, 0], mask.shape)
                    scores.setdefault(f"{which} box (jittered)", []).append(dice(pred, mask))
                target = Target(name, mask)
                scores.setdefault("app click, no learning (box search)", []).append(
                    dice(predictor.predict(image_slice, click_prompt(target, 2, k), EmbeddingKey(name, axis=2, index=k))[0], mask))
            # Active validation (the paper's, lib/core/evaluation): a jittered box, then 5 corrective clicks, through the
            # app's predictor, as the train task reports it.
            items = [(slice_of(k), mask_of(k), 2, k, EmbeddingKey(name, axis=2, index=k)) for k in held_out]
            shared = LRUCache(len(items) + 1)
            for which, encoder in (("vanilla", None), ("learned", encoders["points"])):
                served = PromptPredictor(model, torch.device("cpu"), shared, ObjectMemory(), PredictorSettings())
                v = validate_prompts(lambda si, p, key: served.predict(si, p, key, encoder)[0], items,
                                     np.random.default_rng(0))
                scores[f"active validation {which}: box, +5 clicks"] = f"{v['box_dice']:.3f}, {v['box_then_clicks_dice'][-1]:.3f}"
            rows.append({"structure": name, "slices": n_slices, "train_slices": train, "held_out": len(held_out),
                         "train_seconds_points": round(seconds["points"], 1),
                         "train_seconds_boxes": round(seconds["boxes"], 1),
                         **{key: v if isinstance(v, str) else round(float(np.mean(v)), 3) for key, v in scores.items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = run(build_litemedsam().eval())
    keys = [k for k in rows[0] if k not in ("structure", "slices", "train_slices", "held_out")]
    print("| structure | slices | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['structure']} | {r['slices']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
