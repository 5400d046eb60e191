"""A simulated labelling session (issue 16): which slice should the annotator label next?

    .venv/bin/python benchmarks/bench_active_learning.py [--structures Putamen_L,...] [--json out.json] [--plot out.png]

For each structure, taught from scratch (AAL regions of the One-Prompt held-out families: no model here has seen
them), every policy starts from the same 2 labelled axial slices of Colin27 T1 (drawn as SAM^Med's paper simulates
an annotator: normal around the median foreground slice) and asks for one slice at a time until 8 slices were asked:

- `uncertainty (served)`: the slice-level strategy the server answers Next Sample with
  (`lib/sammed/active_learning.py` `next_uncertain_slice`, on the scores of `lib/sammed/uncertainty.py`);
- `random` (3 seeds): a slice drawn uniformly from the structure's true extent, not yet labelled;
- `evenly spaced`: the slice of the structure's true extent farthest from the labelled ones (so the labelled
  slices stay evenly spread). Random and evenly spaced know the true extent (an annotator sees where the structure
  is when scrolling); the strategy does not: it only has the model.

The simulated annotator labels the asked slice from the AAL truth. A slice without the structure counts as asked
but adds nothing to train on: a saved final label cannot say "nothing here", so the server's train task cannot
see it either; the strategy does not ask it again.

After each step the label's automatic model is retrained with the train task's own code, as `POST /train/litemedsam`
runs it: SAP-Net (`SAPNetLearner`, default settings) on the labelled slices' embeddings, served as SAMauto does
(`auto_segment`, the served settings, anchored on the labelled slices). SAMassist's prompt encoder, trained in the
same run, does not change SAMauto's masks (its refinement is a box, answered by the vanilla encoder) and is not
trained here. Each volume is encoded once (the served encoder runtime) and its embeddings reused.

Scores: whole-volume Dice of SAMauto on Colin27 (every slice, the labelled ones included: what the team gets back),
the same without the labelled slices, and on a second study, MNI152 (AAL carried through the affines: an
APPROXIMATE truth), segmented with no labelled slice of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import nibabel as nib
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.active_learning import widest_spread_slice  # noqa: E402
from lib.core.backbone import SamEncoding  # noqa: E402
from lib.core.evaluation import dice  # noqa: E402
from lib.core.images import load_image  # noqa: E402
from lib.core.runtime import FrozenForward, resolve_runtime  # noqa: E402
from lib.core.transforms import apply_intensity_range, compute_intensity_range, extract_slice  # noqa: E402
from lib.core.transforms.geometry import ModelFrame, Window, crop_window, labels_on_grid, resize_to_model  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.sammed.active_learning import next_uncertain_slice  # noqa: E402
from lib.sammed.auto_segment import AutoSegmentSettings, auto_segment  # noqa: E402
from lib.sammed.samassist import select_training_slices  # noqa: E402
from lib.sammed.sapnet import SAPNetLearner, load_sapnet  # noqa: E402
from lib.sammed.uncertainty import disagreeing_pixels  # noqa: E402

SAMPLE = os.path.join(REPO, "sample-data")
STRUCTURES = ("Putamen_L", "Hippocampus_L", "Insula_L", "Precuneus_L", "Cerebelum_6_L", "Vermis_4_5")
AXIS, START, ASKED = 2, 2, 8
RANDOM_SEEDS = (0, 1, 2)
TARGET_DICE = 0.75


class Study:
    """One volume's axial slices (those of `slab`, [start, stop), when given) and their embeddings, encoded once."""

    def __init__(self, path: str, truth_labels: np.ndarray, encode, slab: tuple[int, int] | None = None):
        image = load_image(path)
        intensity = compute_intensity_range(image.array.numpy(), "MR")
        if slab is not None:
            image.array = image.array[..., slab[0]:slab[1]]
            truth_labels = truth_labels[..., slab[0]:slab[1]]
        self.labels = truth_labels
        self.num_slices = truth_labels.shape[AXIS]
        first = extract_slice(image.array[:1], AXIS, 0)
        self.shape = tuple(first.shape[-2:])
        frame = ModelFrame(Window.whole(self.shape), 256)
        start, self.embeddings = time.perf_counter(), []
        for k in range(self.num_slices):
            x = resize_to_model(crop_window(apply_intensity_range(extract_slice(image.array[:1], AXIS, k), intensity),
                                            frame.window), frame).expand(3, -1, -1)
            with torch.inference_mode():
                self.embeddings.append(encode(x[None]).half())
        self.encode_s_per_slice = (time.perf_counter() - start) / self.num_slices

    def embed(self, k: int) -> torch.Tensor:
        return self.embeddings[k].float()

    def truth(self, value: int) -> np.ndarray:
        """(slices, rows, cols) of the structure, as SAMauto's stacks are laid out."""
        volume = self.labels == value
        return np.stack([extract_slice(volume[None], AXIS, k)[0].numpy() for k in range(self.num_slices)])


def train_sapnet(model, study: Study, truth: np.ndarray, labelled: list[int]):
    learner = SAPNetLearner(model, torch.device("cpu"))
    for k in labelled:
        learner.add_slice(None, truth[k], index=k, embedding=study.embed(k))
    learned = learner.train()
    return load_sapnet(learned.state_dict, learned.info()), learned.seconds


def segment(model, net, study: Study, annotated: dict):
    return auto_segment(model, net, study.embed, study.num_slices, study.shape, settings=AutoSegmentSettings(),
                        annotated=annotated)


def _step(model, colin: Study, mni: Study | None, value: int, truth, labelled, asked, annotated, asked_at_end):
    """Retrain on the labelled slices, segment the volume: (SAMauto's result, the step's scores)."""
    net, train_s = train_sapnet(model, colin, truth, labelled)
    t0 = time.perf_counter()
    result = segment(model, net, colin, annotated)
    infer_s = time.perf_counter() - t0
    predicted = result.labels > 0
    held_out = np.setdiff1d(np.arange(len(truth)), labelled)
    step = {"asked": len(asked), "labelled": len(labelled), "slices": list(asked),
            "dice": round(dice(predicted, truth), 4),
            "dice_unlabelled_slices": round(dice(predicted[held_out], truth[held_out]), 4),
            # the second study at the first and last step only: a whole extra volume per step
            "dice_second_study": (round(dice(segment(model, net, mni, {}).labels > 0, mni.truth(value)), 4)
                                  if mni is not None and len(asked) in (START, asked_at_end) else None),
            "train_s": round(train_s, 2), "segment_s": round(infer_s, 2)}
    return result, step


def simulate(model, colin: Study, mni: Study | None, value: int, policy: str, seed: int | None,
             asked_at_end: int = ASKED, first_steps: dict | None = None) -> dict:
    """One labelling session; mni None: no second study. `first_steps`: shared between the sessions of one
    structure, which all start from the same slices (SAP-Net's training is seeded): the first step is run once."""
    truth = colin.truth(value)
    extent = np.nonzero(truth.reshape(len(truth), -1).any(1))[0].tolist()
    start = select_training_slices(truth.transpose(1, 2, 0), 2, START, np.random.default_rng(0))
    rng = np.random.default_rng(seed)
    asked, labelled, steps = list(start), list(start), []
    while True:
        annotated = {k: truth[k] for k in labelled}
        if first_steps is not None and len(asked) == START and value in first_steps:
            result, step = first_steps[value]
            steps.append(step)
        else:
            result, step = _step(model, colin, mni, value, truth, labelled, asked, annotated, asked_at_end)
            steps.append(step)
            if first_steps is not None and len(asked) == START:
                first_steps[value] = result, step
        if len(asked) >= asked_at_end:
            break
        if policy == "uncertainty (served)":
            chosen = next_uncertain_slice(disagreeing_pixels(result.coarse, result.labels, annotated), asked)
            k = chosen[0] if chosen else widest_spread_slice(asked, list(range(len(truth))))
        elif policy == "random":
            k = int(rng.choice([s for s in extent if s not in asked]))
        elif policy == "evenly spaced":
            k = widest_spread_slice(asked, extent)
        else:
            raise ValueError(policy)
        asked.append(int(k))
        if truth[k].any():
            labelled.append(int(k))
    return {"policy": policy, "seed": seed, "extent": [extent[0], extent[-1]], "start": start, "steps": steps}


def slices_to_reach(steps: list[dict], target: float) -> int | None:
    return next((s["asked"] for s in steps if s["dice"] >= target), None)


def summarise(runs: list[dict]) -> dict:
    """Per policy: the mean curve over structures (random: over seeds too), slices to reach the target."""
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in runs):
        mine = [r for r in runs if r["policy"] == policy]
        curve = np.mean([[s["dice"] for s in r["steps"]] for r in mine], axis=0)
        second = [float(np.mean([r["steps"][i]["dice_second_study"] for r in mine])) for i in (0, -1)]
        reached = [slices_to_reach(r["steps"], TARGET_DICE) for r in mine]
        out[policy] = {"asked": [s["asked"] for s in mine[0]["steps"]], "dice": [round(v, 4) for v in curve],
                       "dice_second_study_first_last": [round(v, 4) for v in second],
                       "reached_target": f"{sum(r is not None for r in reached)}/{len(reached)}",
                       "median_slices_to_target": (float(np.median([r for r in reached if r is not None]))
                                                   if any(r is not None for r in reached) else None),
                       "train_s_per_step": round(float(np.mean([s["train_s"] for r in mine for s in r["steps"]])), 2)}
    return out


def plot(runs: list[dict], structures: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"uncertainty (served)": "tab:red", "random": "tab:grey", "evenly spaced": "tab:blue"}
    panels = structures + ["mean"]
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for policy, colour in colours.items():
            mine = [r for r in runs if r["policy"] == policy and (panel == "mean" or r["structure"] == panel)]
            if not mine:
                continue
            x = [s["asked"] for s in mine[0]["steps"]]
            ys = np.array([[s["dice"] for s in r["steps"]] for r in mine])
            ax.plot(x, ys.mean(0), color=colour, label=policy, marker="o", markersize=3)
            if len(ys) > 1 and panel != "mean" and policy == "random":
                ax.fill_between(x, ys.min(0), ys.max(0), color=colour, alpha=0.2)
        ax.axhline(TARGET_DICE, color="k", lw=0.5, ls=":")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("slices asked")
    for ax in axes[:, 0]:
        ax.set_ylabel("SAMauto volume Dice")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Colin27 T1, AAL structures taught from 2 slices; one slice added per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _saved_runs(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def _save(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--runtime", default="auto", help="the encoder runtime (the served default: auto)")
    parser.add_argument("--policies", default="uncertainty (served),evenly spaced,random")
    parser.add_argument("--seeds", default=",".join(map(str, RANDOM_SEEDS)))
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json, run the others")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    begin = time.perf_counter()
    model = build_litemedsam().eval()
    runtime = resolve_runtime(args.runtime, torch.device("cpu"))
    encode = FrozenForward(SamEncoding(model), runtime, os.path.join(REPO, "apps", "model", "runtime"))
    label_img = nib.load(os.path.join(SAMPLE, "labels", "final", "colin27_t1.nii.gz"))
    labels = np.asarray(label_img.dataobj).round().astype(np.int32)
    mni_path = os.path.join(SAMPLE, "mni152_t1.nii.gz")
    mni_img = nib.load(mni_path)
    colin = Study(os.path.join(SAMPLE, "colin27_t1.nii.gz"), labels, encode)
    mni = Study(mni_path, labels_on_grid(labels, label_img.affine, mni_img.shape, mni_img.affine), encode)
    print(f"encoded ({runtime}): {colin.encode_s_per_slice:.3f} / {mni.encode_s_per_slice:.3f} s per slice", flush=True)
    with open(os.path.join(SAMPLE, "labels", "colin27_aal_names.json")) as f:
        values = {name: int(v) for v, name in json.load(f).items()}
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    runs = _saved_runs(args.json) if args.resume else []
    first_steps = {}
    for structure in structures:
        for policy in [p.strip() for p in args.policies.split(",")]:
            for seed in ([int(v) for v in args.seeds.split(",")] if policy == "random" else [None]):
                if any((r["structure"], r["policy"], r["seed"]) == (structure, policy, seed) for r in runs):
                    continue  # measured in an earlier, interrupted run (--resume)
                run = {"structure": structure, **simulate(model, colin, mni, values[structure], policy, seed,
                                                               first_steps=first_steps)}
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "steps"}),
                      [s["dice"] for s in run["steps"]], run["steps"][-1]["slices"], flush=True)
                if args.json:  # after every run: a long benchmark interrupted keeps what it measured
                    _save(args.json, {"structures": structures, "runtime": runtime, "runs": runs, "complete": False})
    summary = summarise(runs)
    print("\n| policy | " + " | ".join(f"{n} asked" for n in summary[next(iter(summary))]["asked"])
          + " | reached 0.75 | median slices to 0.75 | SAP-Net training s per step |")
    print("|---|" + "---:|" * (len(summary[next(iter(summary))]["asked"]) + 3))
    for policy, s in summary.items():
        print(f"| {policy} | " + " | ".join(f"{v:.3f}" for v in s["dice"])
              + f" | {s['reached_target']} | {s['median_slices_to_target']} | {s['train_s_per_step']} |")
    print("\nsecond study (MNI152, approximate truth), SAMauto Dice after the first and the last step:")
    for policy, s in summary.items():
        print(f"| {policy} | " + " | ".join(f"{v:.3f}" for v in s["dice_second_study_first_last"]) + " |")
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
    if args.json:
        _save(args.json, {"structures": structures, "runtime": runtime, "summary": summary, "runs": runs,
                          "encode_s_per_slice": [colin.encode_s_per_slice, mni.encode_s_per_slice],
                          "total_s_this_run": round(time.perf_counter() - begin), "complete": True})
    if args.plot:
        plot(runs, structures, args.plot)


if __name__ == "__main__":
    main()
