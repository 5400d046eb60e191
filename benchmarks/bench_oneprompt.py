"""One-Prompt: held-out Dice per prompt kind against two baselines run in the same script, and CPU time per slice
and per volume.

    .venv/bin/python scripts/build_oneprompt_data.py          # once, ~20 s: data/oneprompt/
    .venv/bin/python benchmarks/bench_oneprompt.py [--weights PATH] [--json out.json] [--templates 1]

Dice: every held-out task of data/oneprompt (tasks no training step saw: six AAL structure pairs, all INIA19
macaque regions, the nuclei), each query of its test split given each template of its template split with an
oracle prompt of each kind (lib.oneprompt.training.evaluation.evaluate). Baselines: (a) frozen LiteMedSAM given the
template's prompt copied onto the query (the box; the click as a point; the doodle's box), (b) the training-free
prototype (masked average of the template's encoder features under its mask, cosine similarity on the query,
threshold calibrated on training tasks). Reported per task group and overall (tasks weighted equally).

Time: the encoder and the decoder per slice against LiteMedSAM (encoder + box decoder) in the same run, and a
whole Colin27 volume (181 axial slices) through the served task (lib/oneprompt/infer.py: register a template,
then `segment`), with and without the slices' features cached. Whole-volume Dice of every held-out AAL structure
(`volume_dice`): a box template on Colin27, then the whole Colin27 volume and the second study,
sample-data/mni152_t1.nii.gz (truth: AAL carried through the affines, approximate), with the served task's volume
gate (the default) and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.oneprompt.checkpoint import DEFAULT_WEIGHTS, load_oneprompt  # noqa: E402
from lib.oneprompt.infer import OnePromptInfer  # noqa: E402
from lib.oneprompt.templates import TemplateStore  # noqa: E402
from lib.oneprompt.model import Prompt  # noqa: E402
from lib.oneprompt.model.prompt_encoder import PROMPT_KINDS  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.oneprompt import training as op  # noqa: E402
from lib.core.transforms.geometry import labels_on_grid  # noqa: E402

from bench_models import median_ms  # noqa: E402  (benchmarks/ is on the path when run as a script)

DATA = os.path.join(REPO, "data", "oneprompt")
SAMPLE = os.path.join(REPO, "sample-data")


def group_of(task: str) -> str:
    return {"colin27_aal": "AAL structures (Colin27)", "inia19_neuromaps": "macaque regions (INIA19)",
            "nuclei_dsb": "nuclei (microscopy)"}.get(task.split("/")[0], task.split("/")[0])


def dice_tables(result: dict) -> dict:
    columns = [*PROMPT_KINDS, *(f"litemedsam_{k}" for k in PROMPT_KINDS), "prototype"]
    groups: dict = {}
    for task, row in result["per_task"].items():
        groups.setdefault(group_of(task), []).append(row)
    groups["all held-out tasks"] = list(result["per_task"].values())
    return {g: {"tasks": len(rows), **{c: float(np.mean([r[c] for r in rows if c in r])) for c in columns}}
            for g, rows in groups.items()}


def markdown(tables: dict) -> str:
    lines = ["| tasks | prompt | One-Prompt (ours) | LiteMedSAM, template prompt copied | prototype |",
             "|---|---|---:|---:|---:|"]
    for group, row in tables.items():
        for kind in PROMPT_KINDS:
            lines.append(f"| {group} ({row['tasks']}) | {kind} | {row[kind]:.3f} | {row[f'litemedsam_{kind}']:.3f} "
                         f"| {row['prototype']:.3f} |")
    return "\n".join(lines)


def time_slices(model, sam) -> dict:
    image = torch.rand(1, 3, 256, 256)
    feats = model.encode(image)
    out = {"oneprompt_encoder_ms": median_ms(lambda: model.encode(image), 5, 1)}
    prompts = {"click": Prompt.click([[[120.0, 130.0]]], [[1]]), "bbox": Prompt.bbox([[90.0, 100.0, 150.0, 160.0]])}
    with torch.inference_mode():
        for kind, prompt in prompts.items():
            out[f"oneprompt_decoder_{kind}_ms"] = median_ms(lambda: model(feats, feats, prompt), 10, 1)
        embedding = sam.image_encoder(image)
        out["litemedsam_encoder_ms"] = median_ms(lambda: sam.image_encoder(image), 5, 1)
        out["litemedsam_decoder_box_ms"] = median_ms(
            lambda: sam.decode(embedding, boxes=torch.tensor([[90.0, 100.0, 150.0, 160.0]])), 10, 1)
    out["ratio_per_slice"] = ((out["oneprompt_encoder_ms"] + out["oneprompt_decoder_bbox_ms"])
                              / (out["litemedsam_encoder_ms"] + out["litemedsam_decoder_box_ms"]))
    return out


def time_volume(model) -> dict:
    """Register a box template on Colin27's largest Putamen_L slice, then segment the whole volume twice."""
    import nibabel as nib

    image = os.path.join(SAMPLE, "colin27_t1.nii.gz")
    label = np.asarray(nib.load(os.path.join(SAMPLE, "labels", "final", "colin27_t1.nii.gz")).dataobj).round()
    with open(os.path.join(SAMPLE, "labels", "colin27_aal_names.json")) as f:
        value = {name: int(v) for v, name in json.load(f).items()}["Putamen_L"]
    k = int(np.argmax((label == value).sum((0, 1))))
    i, j = np.nonzero(label[:, :, k] == value)
    with tempfile.TemporaryDirectory() as tmp:
        task = OnePromptInfer(lambda device: model, TemplateStore(tmp), feature_cache_size=256, progress_every=1000)
        task({"image": image, "mode": "register", "label": "Putamen_L",
              "roi": [int(i.min()), int(i.max()), int(j.min()), int(j.max()), k, k]})
        t = time.perf_counter()
        path, first = task({"image": image, "template": "Putamen_L"})
        cold = time.perf_counter() - t
        predicted = np.asarray(nib.load(path).dataobj) > 0
        t = time.perf_counter()
        _, again = task({"image": image, "template": "Putamen_L"})
        warm = time.perf_counter() - t
    truth = label == value
    shape = truth.shape
    inter = float((predicted & truth).sum())
    return {"slices": shape[2], "encoded_slices": first["encoder_runs"], "cold_s": cold, "cold_s_per_slice":
            cold / shape[2], "features_cached_s": warm, "labelled_slices": first["labelled_slices"],
            "slices_with_the_structure": int(truth.any((0, 1)).sum()),
            "volume_dice": 2 * inter / max(1.0, float(predicted.sum() + truth.sum()))}


VOLUME_METHODS = {
    "propagate (ours, lib/oneprompt/volume.py)": "propagate",
    "the volume gate (served default)": "gate",
    "the model alone on every slice (paper)": "slices",
    "copied ground-truth mask, true extent": "copied mask",
    "copied box into LiteMedSAM, true extent": "copied box",
    "LiteMedSAM propagated, stop when empty": "propagated box",
}


def _study(task, path: str, axis: int = 2) -> tuple:
    """(context, frame, geometry) of one study, for the in-process baselines."""
    from lib.oneprompt.infer import slice_geometry

    image, _ = task.image_loader(path)
    range_key, intensity = image.intensity(None, None)
    context = {"image": image, "range_key": range_key, "intensity": intensity, "encoder_runs": 0}
    return context, task.frame(image, axis), slice_geometry(image, axis)


def _paste(masks: dict, shape, axis: int = 2) -> np.ndarray:
    """{slice: (rows, cols) mask} -> a bool volume."""
    from lib.core.transforms.geometry import paste_slice

    volume = np.zeros(shape, np.uint8)
    for k, mask in masks.items():
        paste_slice(np.asarray(mask, np.uint8), shape, axis, k, volume)
    return volume > 0


def _scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Whole-volume Dice; Dice on the slices that hold the structure; false-positive voxels on those that do not."""
    held = truth.any((0, 1))
    inter = float((predicted & truth).sum())
    on_held = predicted[:, :, held]
    return {"dice": 2 * inter / max(1.0, float(predicted.sum() + truth.sum())),
            "dice_on_held_slices": 2 * inter / max(1.0, float(on_held.sum() + truth.sum())),
            "false_positive_voxels_off_held_slices": int(predicted[:, :, ~held].sum()),
            "labelled_slices": int(predicted.any((0, 1)).sum())}


def baseline(method: str, task, template, study: tuple, template_study: tuple, truth: np.ndarray,
             template_truth: np.ndarray) -> np.ndarray:
    """A baseline's volume. The copied ones are given the true extent (the slices that hold the structure): an
    oracle our method does not have. Another study gets the template's mask or box at the same relative place of
    the slice's body box (One-Prompt's frame: the same model pixels), and the propagation baseline its seed on the
    slice at the template slice's relative position in the body (`body_extent`), as our locator starts."""
    from lib.oneprompt.infer import TemplateSliceModels
    from lib.oneprompt.volume import VolumeSettings, body_extent, trace

    context, frame, geometry = study
    image = context["image"]
    models = TemplateSliceModels(task, context, 2, frame, [template])
    held = [int(k) for k in np.nonzero(truth.any((0, 1)))[0]]
    k0 = template.meta["slice"]
    if method == "copied mask":
        _, template_frame, _ = template_study
        model_mask = torch.as_tensor(template_frame.mask_to_model(template_truth[:, :, k0].T), dtype=torch.float32)
        on_slice = (frame.to_slice(model_mask) > 0.5).numpy()
        return _paste({k: on_slice for k in held}, image.spatial_shape)
    box = models.slice_box(models.template_boxes[0])
    if method == "copied box":
        masks = {}
        for k in held:
            answer = models.sam(k, box)
            if answer is not None:
                masks[k] = answer[0]
        return _paste(masks, image.spatial_shape)
    if method == "propagated box":
        if image.path == template.meta["image_path"]:
            seed_k = k0
        else:
            first, last = body_extent(image, 2)
            seed_k = int(round(first + template.meta["relative_position"] * (last - first)))
        seed_mask = models.sam(seed_k, box)[0]
        masks = {seed_k: seed_mask}
        only_area = VolumeSettings(max_similarity_drop=float("inf"), max_growth=float("inf"),
                                   max_intensity_shift=float("inf"), anchor=False)
        for direction in (1, -1):
            steps = trace(models, seed_k, seed_mask, direction, image.spatial_shape[2], geometry, only_area)
            masks.update({s.index: s.mask for s in steps if not s.stop})
        return _paste(masks, image.spatial_shape)
    raise ValueError(method)


def volume_comparison(model, structures=None) -> dict:
    """Whole-volume Dice of the held-out AAL structures (templates never trained on), our served default against
    the baselines (`VOLUME_METHODS`), all in this run: for each, a box template on Colin27's slice where the
    structure is largest, then (a) the whole Colin27 volume (the same study: every other slice, including the ~140
    where the structure is absent) and (b) a SECOND STUDY, the MNI152 2009a template (sample-data/mni152_t1.nii.gz,
    from the nilearn wheel; another brain, an average of 152 subjects, scanned and processed differently, brain
    only where Colin27 has the head), whose truth is AAL carried onto its grid through both images' affines
    (lib.core.transforms.geometry.labels_on_grid; both in MNI space; APPROXIMATE: AAL was drawn on Colin27, so
    boundaries can be off by a few mm). Every slice of both volumes is encoded once (cached) and shared by every
    method; the seconds of the served method are measured on cached features, plus the encoder's time per slice
    for the slices it visits."""
    import nibabel as nib

    from lib.oneprompt.dataset import HELDOUT_AAL

    image = os.path.join(SAMPLE, "colin27_t1.nii.gz")
    label_img = nib.load(os.path.join(SAMPLE, "labels", "final", "colin27_t1.nii.gz"))
    label = np.asarray(label_img.dataobj).round().astype(np.int32)
    with open(os.path.join(SAMPLE, "labels", "colin27_aal_names.json")) as f:
        values = {name: int(v) for v, name in json.load(f).items()}
    structures = structures or [n for n in values if any(n.startswith(h) for h in HELDOUT_AAL)]
    second = os.path.join(SAMPLE, "mni152_t1.nii.gz")  # the unlabelled sample study (no stored label)
    img2 = nib.load(second)
    studies = {"colin27 (same study)": (image, label),
               "mni152 (second study)": (second, labels_on_grid(label, label_img.affine, img2.shape, img2.affine))}
    out = {"structures": {}, "studies": list(studies), "methods": list(VOLUME_METHODS)}
    with tempfile.TemporaryDirectory() as tmp:
        task = OnePromptInfer(lambda device: model, TemplateStore(tmp), feature_cache_size=1024,
                              progress_every=1000, encoder_runtime="auto")
        task.backbone.embeddings.max_items, task.backbone.embeddings.max_bytes = 8192, None  # SAM's zoomed windows
        contexts = {study: _study(task, path) for study, (path, _) in studies.items()}
        t = time.perf_counter()
        for study, (context, frame, _) in contexts.items():  # encode every slice once
            for k in range(context["image"].spatial_shape[2]):
                task.encoded(context, 2, k, frame)
        encoded = sum(c["encoder_runs"] for c, _, _ in contexts.values())
        out["encoder_s_per_slice"] = (time.perf_counter() - t) / max(1, encoded)
        for name in structures:
            value = values[name]
            k = int(np.argmax((label == value).sum((0, 1))))
            i, j = np.nonzero(label[:, :, k] == value)
            task({"image": image, "mode": "register", "label": name,
                  "roi": [int(i.min()), int(i.max()), int(j.min()), int(j.max()), k, k]})
            template = task.store.load(task.store.resolve(name)[0])
            row = {}
            for study, (path, truth_label) in studies.items():
                truth = truth_label == value
                row[study] = {"slices_with_the_structure": int(truth.any((0, 1)).sum()), "slices": int(truth.shape[2])}
                for method, key in VOLUME_METHODS.items():
                    t = time.perf_counter()
                    if key in ("propagate", "gate", "slices"):
                        result_path, info = task({"image": path, "template": name, "volume": key})
                        predicted = np.asarray(nib.load(result_path).dataobj) > 0
                        os.remove(result_path)
                    else:
                        info = None
                        predicted = baseline(key, task, template, contexts[study], contexts["colin27 (same study)"],
                                             truth, label == value)
                    row[study][key] = {**_scores(predicted, truth), "seconds_on_cached_features":
                                       round(time.perf_counter() - t, 2)}
                    if key == "propagate":
                        row[study][key]["visited_slices"] = info["volume"]["visited_slices"]
                        row[study][key]["seed"] = info["volume"]["seed"]
                        row[study][key]["seed_slice"] = info["volume"]["seed_slice"]
            out["structures"][name] = row
            print(name, json.dumps({s: {m: round(r[m]["dice"], 3) for m in VOLUME_METHODS.values()}
                                    for s, r in row.items()}), flush=True)
    out["mean"] = {s: {m: {metric: float(np.mean([r[s][m][metric] for r in out["structures"].values()]))
                           for metric in ("dice", "dice_on_held_slices", "false_positive_voxels_off_held_slices",
                                          "labelled_slices")}
                       for m in VOLUME_METHODS.values()} for s in studies}
    return out


def volume_markdown(result: dict) -> str:
    lines = ["| method | " + " | ".join(f"{s}: volume Dice / Dice on held slices / FP voxels elsewhere"
                                        for s in result["studies"]) + " |",
             "|---|" + "---:|" * len(result["studies"])]
    for method, key in VOLUME_METHODS.items():
        cells = []
        for study in result["studies"]:
            m = result["mean"][study][key]
            cells.append(f"{m['dice']:.3f} / {m['dice_on_held_slices']:.3f} / "
                         f"{m['false_positive_voxels_off_held_slices']:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--templates", type=int, default=None, help="templates per held-out task (default: all, 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-volume", action="store_true", help="no whole-volume timing or Dice")
    p.add_argument("--skip-timing", action="store_true", help="no per-slice or per-volume timing")
    p.add_argument("--skip-dice", action="store_true",
                   help="no held-out slice Dice (timings and whole-volume Dice only)")
    p.add_argument("--volume-structures", default=None,
                   help="comma-separated AAL names for the whole-volume comparison (default: the held-out ones)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(DATA, "manifest.json")):
        print("data/oneprompt is missing: run scripts/build_oneprompt_data.py first", file=sys.stderr)
        return 2
    model = load_oneprompt(args.weights, torch.device("cpu"))
    sam = build_litemedsam().eval()
    store = op.SampleStore(DATA)
    cache = op.FeatureCache(os.path.join(DATA, "features"), store, views=1)
    report = {"weights": os.path.relpath(args.weights, REPO), "threads": args.threads,
              "date": time.strftime("%Y-%m-%d")}
    if not args.skip_dice:
        cache.build(model)  # clean views only; already there after training
        t = time.perf_counter()
        threshold = op.calibrate_prototype_threshold(store, cache, max_tasks=20)
        result = op.evaluate(model, store, cache, sam=sam, prototype_threshold=threshold,
                             max_templates=args.templates, log=lambda m: print(m, flush=True))
        report["dice"] = dice_tables(result)
        report["dice_seconds"] = time.perf_counter() - t
        report["prototype_threshold"] = threshold
        print(markdown(report["dice"]))
    if not args.skip_timing:
        report["slice_timing"] = time_slices(model, sam)
        print(json.dumps(report["slice_timing"], indent=1))
    if not args.skip_volume and not args.skip_timing:
        report["volume_timing"] = time_volume(model)
        print(json.dumps(report["volume_timing"], indent=1))
    if not args.skip_volume:
        structures = args.volume_structures.split(",") if args.volume_structures else None
        report["volume_comparison"] = volume_comparison(model, structures)
        print(volume_markdown(report["volume_comparison"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
