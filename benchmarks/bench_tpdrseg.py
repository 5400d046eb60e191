"""TP-DRSeg against its baselines on the held-out SYNTHETIC fundus-lesion test split, in one run.

    python benchmarks/bench_tpdrseg.py [--desc PATH] [--names PATH] [--adapter RUN_DIR] [--images N]
                                       [--threads N] [--json OUT]

Models (a missing one is skipped, with the reason printed):
* TP-DRSeg reading each class's explicit description (the method): `--desc`, a trainer run folder or an exported .pt;
  default: the served weights (`tpdrseg_weights` of configs/app.yaml, by default
  lib/tpdrseg/weights/tpdrseg_litemedsam.pt) when present, else data/tpdrseg/run_desc;
* TP-DRSeg reading the bare class names (the paper's ablation): `--names`; default
  lib/tpdrseg/weights/tpdrseg_litemedsam_names.pt when present, else data/tpdrseg/run_name;
* the MSA adapter baseline (learned class tokens, no text): `--adapter`, a trainer run folder (default
  data/tpdrseg/run_adapter);
* zero-shot LiteMedSAM (frozen, never trained here), prompted with one box over the whole image: it is class-agnostic,
  so its one mask and its probabilities are scored against every class (the paper's "Vanilla SAM" row).

All on the same frozen LiteMedSAM encoder weights, on the first N of the 20 test images (lib/tpdrseg/dataset.py),
at the models' 256 px as the trainer evaluates them (`prepare_arrays` of lib/tpdrseg/preprocessing.py: area-averaged
images, max-pooled masks), scored by the trainer's `lesion_metrics`: per class Dice at 0.5, AUC-ROC and AUC-PR with
all pixels pooled, and their means.
Time: ms per image for all four classes on CPU (TP-DRSeg runs its injected encoder once per class, the adapter and
LiteMedSAM once per image), the median over the test images after one warm-up image, and its ratio to LiteMedSAM's.
Parameters: trainable / total of the segmentation model; TP-DRSeg's total excludes the frozen text encoder (MiniLM,
22.7 M), which runs once per class text, not per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.tpdrseg.dataset import ABBREVIATIONS, CLASSES  # noqa: E402
from lib.tpdrseg.preprocessing import prepare_arrays  # noqa: E402
from lib.tpdrseg.training import DEFAULT_DATA, lesion_metrics  # noqa: E402

NAMES_WEIGHTS = REPO / "lib" / "tpdrseg" / "weights" / "tpdrseg_litemedsam_names.pt"
RUNS = REPO / "data" / "tpdrseg"
SYNTHETIC_HEADER = ("Lesions are SYNTHETIC (painted on a real normal fundus by lib/tpdrseg/dataset.py): these "
                    "numbers say nothing about real DR images. TP-DRSeg's offline prior uses MiniLM "
                    "(all-MiniLM-L6-v2) + a learned projection, not CLIP.")


def configured_weights() -> Path:
    """The TP-DRSeg weights the server is configured with (configs/app.yaml `tpdrseg_weights`, else its default)."""
    from lib.core.settings import REPO_ROOT, load_settings, resolve_path
    from lib.tpdrseg.served_models import DEFAULT_WEIGHTS

    return Path(resolve_path(load_settings().get("tpdrseg_weights") or DEFAULT_WEIGHTS, REPO_ROOT))


def first_present(*paths: Path) -> Path:
    return next((p for p in paths if p.exists()), paths[-1])


# -- the four models, each as images (1, 3, S, S) -> probabilities (K, S, S) -----------------------------------
class TrainedModel:
    """TP-DRSeg or the adapter baseline: one probability map per class from its own class prompt."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(self.model(x))[0].numpy()

    def parameters(self) -> dict:
        counts = self.model.parameter_counts()
        return {"trainable": counts["trainable"], "total": counts["total"]}


class ZeroShotLiteMedSAM:
    """Frozen LiteMedSAM with a box over the whole image: one class-agnostic mask, the answer for every class."""

    def __init__(self, sam, num_classes: int):
        self.sam, self.num_classes = sam.eval(), num_classes
        side = float(sam.image_size)
        self.whole_image_box = torch.tensor([[0.0, 0.0, side, side]])  # x0, y0, x1, y1 in the model's input frame

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        low_res, _ = self.sam.decode(self.sam.encode(x), boxes=self.whole_image_box)
        probs = torch.sigmoid(self.sam.upscale_logits(low_res))[0, 0]
        return np.repeat(probs.numpy()[None], self.num_classes, axis=0)

    def parameters(self) -> dict:
        return {"trainable": 0, "total": sum(p.numel() for p in self.sam.parameters())}


def load_tpdrseg(path: Path, shared_sam, expected_class_text: str):
    """(TrainedModel, notes) from a trainer run folder or an exported .pt, read as the server reads it."""
    from lib.tpdrseg.served_models import TPDRSegModels

    loader = TPDRSegModels(str(path), str(path) + ".no-trained-weights", lambda device: shared_sam, device="cpu")
    model, meta = loader.load(str(path))
    class_text = model.config.get("class_text", "description")
    if class_text != expected_class_text:
        print(f"warning: {path} was trained with class text {class_text!r}, this row expects "
              f"{expected_class_text!r}", file=sys.stderr)
    return TrainedModel(model), {"class_text": class_text, "text_encoder": meta["text_encoder"],
                                 "steps": training_steps(path)}


def training_steps(path: Path):
    """Steps the weights were trained for, from the .json beside them (read_weights keeps only the model config)."""
    record = path / "tpdrseg.json" if path.is_dir() else path.with_suffix(".json")
    if not record.is_file():
        return None
    with open(record) as f:
        record = json.load(f)
    if path.is_dir():  # a trainer run
        return (record.get("history") or {}).get("config", {}).get("steps")
    return record.get("steps")  # exported by scripts/export_tpdrseg_weights.py, or by the train task


def load_adapter(run_dir: Path):
    """(TrainedModel, notes) of an adapter-baseline trainer run, on its own LiteMedSAM (the adapters are added to
    the backbone's blocks, so it is not shared with the other rows)."""
    from lib.models.sam import build_litemedsam
    from lib.models.sam.adapters import AdapterSettings
    from lib.tpdrseg.model.baselines import AdapterSAM
    from lib.tpdrseg.training import load_trained

    with open(run_dir / "tpdrseg.json") as f:
        run = json.load(f)
    config = run.get("model") or {}
    if config.get("baseline") != "adapter":
        raise ValueError(f"{run_dir} is not an adapter-baseline run (model config {config})")
    model = AdapterSAM(build_litemedsam(), config["class_names"], config["num_sparse_tokens"],
                       AdapterSettings.from_dict(config["adapters"]), config.get("token_std", 0.02))
    load_trained(model, str(run_dir))
    return TrainedModel(model), {"steps": training_steps(run_dir)}


# -- measuring ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_model(predict, images: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """(probabilities (N, K, S, S), ms per image). Timed image by image, after one untimed warm-up image (the first
    call pays for lazy initialisation); benchmarks/bench_models.py's median_ms repeats one input, here every test
    image is both scored and timed."""
    predict(images[:1])
    probs, times = [], []
    for i in range(len(images)):
        start = time.perf_counter()
        probs.append(predict(images[i:i + 1]))
        times.append((time.perf_counter() - start) * 1000)
    return np.stack(probs), times


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n else "0"


def markdown_tables(rows: dict, images: int, threads: int) -> str:
    abbr = dict(zip(CLASSES, ABBREVIATIONS))
    head = (["Model"] + [f"{abbr[c]} Dice" for c in CLASSES] +
            ["mDice", "mAUC-ROC", "mAUC-PR", "ms / image", "× LiteMedSAM time", "trainable / total params"])
    lines = [f"{SYNTHETIC_HEADER} {images} held-out test images, 256 px, Dice at 0.5; CPU, {threads} thread(s), "
             f"all four classes per image.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        m = r["metrics"]
        ratio = fmt(r.get("time_ratio_to_litemedsam"), 2)
        cells = ([name] + [fmt(m[c]["dice"]) for c in CLASSES] +
                 [fmt(m["mDice"]), fmt(m["mAUC_ROC"]), fmt(m["mAUC_PR"]), f"{r['ms_per_image']:.0f}",
                  ratio if ratio == "n/a" else f"{ratio}×",
                  f"{millions(r['parameters']['trainable'])} / {millions(r['parameters']['total'])}"])
        lines.append("| " + " | ".join(cells) + " |")
    head = ["Model"] + [f"{abbr[c]} {k}" for c in CLASSES for k in ("AUC-ROC", "AUC-PR")]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        m = r["metrics"]
        lines.append("| " + " | ".join([name] + [fmt(m[c][k]) for c in CLASSES for k in ("auc_roc", "auc_pr")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--desc", type=Path, default=None, help="TP-DRSeg with descriptions: run folder or .pt")
    parser.add_argument("--names", type=Path, default=None, help="TP-DRSeg with bare class names: run folder or .pt")
    parser.add_argument("--adapter", type=Path, default=RUNS / "run_adapter", help="adapter-baseline run folder")
    parser.add_argument("--images", type=int, default=0, help="the first N test images (default: all 20)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lib.tpdrseg.dataset import ensure_dataset, load_dataset
    from lib.models.sam import build_litemedsam

    images, masks, manifest = load_dataset(ensure_dataset(DEFAULT_DATA), "test")
    if args.images:
        images, masks = images[:args.images], masks[:args.images]
    x, y = prepare_arrays(images, masks, 256)
    desc = args.desc or first_present(configured_weights(), RUNS / "run_desc")
    names = args.names or first_present(NAMES_WEIGHTS, RUNS / "run_name")

    shared_sam = build_litemedsam()  # frozen: the TP-DRSeg rows share it, as the server's weight versions do
    candidates = {
        "TP-DRSeg (descriptions)": (desc, lambda: load_tpdrseg(desc, shared_sam, "description")),
        "TP-DRSeg (bare class names)": (names, lambda: load_tpdrseg(names, shared_sam, "name")),
        "MSA adapter (learned class tokens)": (args.adapter, lambda: load_adapter(args.adapter)),
        "LiteMedSAM zero-shot (whole-image box)": (None, lambda: (ZeroShotLiteMedSAM(build_litemedsam(), len(CLASSES)),
                                                                  {"prompt": "box over the whole image"})),
    }
    rows, skipped = {}, {}
    for name, (source, load) in candidates.items():
        if source is not None and not source.exists():
            skipped[name] = f"{source} does not exist"
            print(f"skipped {name}: {skipped[name]}", file=sys.stderr)
            continue
        try:
            predict, notes = load()
        except (FileNotFoundError, ValueError, KeyError) as e:
            skipped[name] = f"{source}: {e}"
            print(f"skipped {name}: {skipped[name]}", file=sys.stderr)
            continue
        print(f"{name}: {len(x)} images ...", file=sys.stderr, flush=True)
        probs, times = run_model(predict, x)
        rows[name] = {"source": str(source) if source else "lib.models.sam.build_litemedsam (bundled weights)",
                      **notes, "metrics": lesion_metrics(probs, y.numpy(), CLASSES),
                      "ms_per_image": statistics.median(times), "ms_each_image": [round(t, 1) for t in times],
                      "parameters": predict.parameters()}
        del predict, probs
    baseline = rows.get("LiteMedSAM zero-shot (whole-image box)")
    for r in rows.values():
        r["time_ratio_to_litemedsam"] = r["ms_per_image"] / baseline["ms_per_image"] if baseline else None

    if any(r.get("text_encoder") not in (None, "minilm") for r in rows.values()):
        print("warning: a TP-DRSeg row uses the CLIP text encoder: edit the table header's MiniLM sentence",
              file=sys.stderr)
    print(markdown_tables(rows, len(x), args.threads))
    print("\nWeights: " + "; ".join(f"{name}: {r['source']}" for name, r in rows.items()))
    for name, reason in skipped.items():
        print(f"Skipped {name}: {reason}")
    result = {"data": {"split": "test", "images": len(x), "notice": manifest["notice"]},
              "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "models": rows, "skipped": skipped}
    if args.json:
        from lib.tpdrseg.checkpoint import finite

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(finite(result), indent=1))
    return result


if __name__ == "__main__":
    main()
