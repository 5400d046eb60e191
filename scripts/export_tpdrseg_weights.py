"""Turn a TP-DRSeg trainer run into the weights file the server loads (model `tpdrseg`, conf `tpdrseg_weights`).

  python scripts/export_tpdrseg_weights.py RUN_DIR OUT.pt [--fp16]

  # the shipped weights: descriptions (the served default) and bare class names (the ablation)
  python scripts/export_tpdrseg_weights.py data/tpdrseg/run_desc lib/tpdrseg/weights/tpdrseg_litemedsam.pt
  python scripts/export_tpdrseg_weights.py data/tpdrseg/run_name lib/tpdrseg/weights/tpdrseg_litemedsam_names.pt

RUN_DIR is the folder `python -m lib.tpdrseg.training --output RUN_DIR` writes (tpdrseg.safetensors + tpdrseg.json).
OUT.pt (+ OUT.json beside it) is written by `lib.tpdrseg.checkpoint.write_weights`, as the train task's weights are, with
the run's model config and, as metadata: the training config, the training command (as recorded, else rebuilt from
the config and marked so), the steps, the final metrics on the held-out test split, and the SYNTHETIC-data notice.
`--fp16` stores the tensors in half precision (half the file size); the server reads them back as float32.

The run is read with the server's own loader (`TPDRSegModels.load`), so a run that does not fit the model is refused
before anything is written; then OUT.pt is loaded the way the infer task loads its configured weights, and its
tensors and its probabilities on one synthetic test image are compared with the run's. Adapter-baseline runs
(`--model adapter`) are refused: the server serves TP-DRSeg only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.tpdrseg.checkpoint import read_weights, write_weights  # noqa: E402
from lib.tpdrseg.preprocessing import prepare_arrays  # noqa: E402
from lib.tpdrseg.served_models import TPDRSegModels  # noqa: E402
from lib.tpdrseg.training import DEFAULT_DATA, TrainConfig, predict  # noqa: E402

# float16 keeps 11 significant bits: a round trip changes a value by at most half a unit in the last place.
FP16_RELATIVE_ERROR = 2.0 ** -11


def repo_relative(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def read_run(run_dir: Path) -> dict:
    """The tpdrseg.json of a trainer run folder ({"model": config, "history": ...}); SystemExit with the reason when
    it is not one, or when it is a baseline's run."""
    config_file, tensors_file = run_dir / "tpdrseg.json", run_dir / "tpdrseg.safetensors"
    for f in (config_file, tensors_file):
        if not f.is_file():
            raise SystemExit(f"{run_dir} is not a finished trainer run: {f.name} is missing "
                             f"(`python -m lib.tpdrseg.training --output {run_dir}` writes both files at the end)")
    with open(config_file) as f:
        run = json.load(f)
    model_config = run.get("model") or {}
    if model_config.get("baseline"):
        raise SystemExit(f"{run_dir} is a run of the {model_config['baseline']!r} baseline (--model "
                         f"{model_config['baseline']}), not TP-DRSeg: the server serves TP-DRSeg only, so there is "
                         f"nothing to export. Evaluate the baseline with benchmarks/bench_tpdrseg.py instead.")
    return run


def training_command(run_dir: Path, run: dict) -> tuple[str, bool]:
    """(command, whether it was recorded): the run's own record when it has one (history or top-level "command",
    or a command.txt in the folder), else rebuilt from the config: every option that differs from its default.
    The trainer does not record --threads, so a rebuilt command lacks it."""
    model_config, history = run.get("model") or {}, run.get("history") or {}
    for recorded in (history.get("command"), run.get("command")):
        if recorded:
            return (recorded if isinstance(recorded, str) else shlex.join(recorded)), True
    if (run_dir / "command.txt").is_file():
        return (run_dir / "command.txt").read_text().strip(), True
    args = ["python", "-m", "lib.tpdrseg.training"]
    if model_config.get("class_text", "description") != "description":
        args += ["--class-text", model_config["class_text"]]
    if model_config.get("prior") == "clip":
        args += ["--text-encoder", "clip", "--clip-weights", "<ViT-B-16 checkpoint>"]
    defaults = asdict(TrainConfig())
    for field, value in (history.get("config") or {}).items():
        if field not in defaults or value == defaults[field]:
            continue
        if field in ("data_dir", "output"):
            value = repo_relative(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [f"--{field.replace('_', '-')}", str(value)]
    return shlex.join(args), False


def export(run_dir: str, out: str, fp16: bool = False) -> dict:
    """Write OUT.pt + OUT.json from RUN_DIR and check that the server loads it; returns the check's numbers."""
    from lib.models.sam import build_litemedsam

    run = Path(run_dir)
    run_record = read_run(run)
    history = run_record.get("history") or {}
    sam = build_litemedsam()  # one frozen LiteMedSAM for both loaders (the server shares it the same way)
    loader = TPDRSegModels(str(run), os.path.join(str(run), "no-trained-weights.pt"), lambda device: sam, device="cpu")
    model, meta = loader.load(str(run))

    command, recorded = training_command(run, run_record)
    config = history.get("config") or {}
    final = history.get("final")
    if final is None:
        print(f"warning: {run} has no final test metrics (trained with --evaluate false); exporting without",
              file=sys.stderr)
    losses = [s["loss"] for s in history.get("steps", []) if "loss" in s]
    info = {
        "method": "TP-DRSeg",
        "class_text": model.config.get("class_text", "description"),
        "exported_from": repo_relative(run),
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tensor_dtype": "float16" if fp16 else "float32",
        "training_command": command,
        "training_command_recorded": recorded,
        "training_config": config,
        "steps": config.get("steps", len(history.get("steps", []))),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
        "final": final,
        "final_on": "the held-out test split of the SYNTHETIC fundus-lesion data (lib/tpdrseg/dataset.py), "
                    f"{model.image_size} px, threshold 0.5, all pixels pooled per class",
        "evaluations": history.get("evaluations", []),
        "synthetic_data": True,
        "notice": history.get("notice") or "trained on SYNTHETIC lesions (lib/tpdrseg/dataset.py)",
    }
    write_weights(out, model, meta["text_encoder"], info, dtype=torch.float16 if fp16 else None)
    return check_served(out, model, sam, fp16)


def check_served(out: str, exported_model, sam, fp16: bool) -> dict:
    """Load OUT.pt as the infer task does (configured weights) and compare it with the run's model: tensors (equal,
    or within float16 rounding with --fp16) and probabilities on the first synthetic test image."""
    from lib.tpdrseg.dataset import ensure_dataset, load_dataset

    raw = torch.load(out, map_location="cpu", weights_only=True)["trainable_state"]
    stored = {v.dtype for v in raw.values() if v.is_floating_point()}
    expected_dtype = torch.float16 if fp16 else torch.float32
    if stored != {expected_dtype}:
        raise SystemExit(f"{out} stores {stored}, expected {expected_dtype}")
    state, _ = read_weights(out)
    if any(v.dtype != torch.float32 for v in state.values() if v.is_floating_point()):
        raise SystemExit(f"read_weights did not give float32 tensors back from {out}")

    original = exported_model.trainable_state()
    worst = 0.0
    for name, value in original.items():
        if not torch.isfinite(state[name]).all():
            raise SystemExit(f"{name}: not finite after the round trip (outside float16's range?)")
        error = ((state[name] - value).abs() / value.abs().clamp_min(1e-4)).max().item() if value.numel() else 0.0
        worst = max(worst, error)
    tolerance = FP16_RELATIVE_ERROR * 1.01 if fp16 else 0.0
    if worst > tolerance:
        raise SystemExit(f"tensors changed by up to {worst:.2e} (relative) in {out}; allowed {tolerance:.2e}")

    served = TPDRSegModels(out, os.path.join(os.path.dirname(os.path.abspath(out)), "no-trained-weights.pt"),
                           lambda device: sam, device="cpu")
    model, meta, path, source = served.served("configured")
    if model.config != exported_model.config:
        raise SystemExit(f"served config {model.config} differs from the run's {exported_model.config}")
    images, masks, _ = load_dataset(ensure_dataset(DEFAULT_DATA), "test")
    x, _ = prepare_arrays(images[:1], masks[:1], model.image_size)
    difference = float(abs(predict(model, x) - predict(exported_model, x)).max())
    if not fp16 and difference != 0.0:
        raise SystemExit(f"the served model's probabilities differ from the run's by {difference}")
    return {"path": path, "source": source, "text_encoder": meta["text_encoder"],
            "class_text": model.config.get("class_text"), "tensors": len(state),
            "max_relative_tensor_change": worst, "max_probability_difference": difference,
            "size_bytes": os.path.getsize(out)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="folder written by `python -m lib.tpdrseg.training --output RUN_DIR`")
    parser.add_argument("out", help="the .pt to write (its .json is written beside it)")
    parser.add_argument("--fp16", action="store_true", help="store the tensors in float16 (half the size)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.out.endswith(".pt"):
        parser.error(f"OUT must end in .pt (the server reads a .pt with its .json beside it), got {args.out}")
    torch.set_num_threads(args.threads)
    check = export(args.run_dir, args.out, args.fp16)
    print(f"wrote {args.out} ({check['size_bytes'] / 1e6:.1f} MB, {check['tensors']} tensors, "
          f"{'float16' if args.fp16 else 'float32'}) and {os.path.splitext(args.out)[0]}.json")
    print(f"served as the infer task loads it: text encoder {check['text_encoder']}, class text "
          f"{check['class_text']}; largest relative tensor change {check['max_relative_tensor_change']:.2e}, "
          f"largest probability difference on a test image {check['max_probability_difference']:.2e}")
    return check


if __name__ == "__main__":
    main()
