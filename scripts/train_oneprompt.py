#!/usr/bin/env python
"""Train One-Prompt's decoder on the multi-task 2D data (data/oneprompt/) and evaluate it on held-out tasks.

Stages (each resumable): feature cache (frozen LiteMedSAM encoder, clean + augmented views) -> SegLab
autoencoder -> decoder + prompt encoder -> evaluation on held-out tasks (with the frozen LiteMedSAM and prototype
baselines) -> weights file lib/oneprompt/weights/oneprompt_litemedsam.pt + a JSON beside it.

    nice -n 19 .venv/bin/python scripts/train_oneprompt.py --steps 1000 --batch-size 8 --warmup 50   # the shipped weights
    nice -n 19 .venv/bin/python scripts/train_oneprompt.py --only cache       # just build the feature cache
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def slice_values(data_dir: str, store, cache_dir=None) -> dict:
    """{image key: label values on that slice} for every data set of the build (lib.oneprompt.dataset.
    slice_label_values), cached in <data>/slice_values.json for this manifest (a few seconds to recompute)."""
    from lib.core.stores import atomic_write
    from lib.oneprompt import dataset as tasks

    path = os.path.join(data_dir, "slice_values.json")
    manifest = store.manifest_hash()
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("manifest_sha256") == manifest:
            return cached["values"]
    params = store.manifest["parameters"]
    built = {d["name"] if isinstance(d, dict) else d for d in store.manifest.get("datasets", [])}
    values = {}
    for spec in tasks.dataset_catalogue(tasks.SAMPLE_DATA, cache_dir or tasks.DEFAULT_CACHE):
        if not built or spec.name in built:
            values.update(tasks.slice_label_values(spec, params["size"], params["axes"]))
    atomic_write(path, lambda f: f.write(json.dumps({"manifest_sha256": manifest, "values": values}).encode()))
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "data", "oneprompt"))
    p.add_argument("--features", default=None, help="feature cache folder (default <data>/features)")
    p.add_argument("--views", type=int, default=2, help="views per training image: 1 clean + (views-1) augmented")
    p.add_argument("--cache-budget", type=float, default=None, help="seconds for the cache build")
    p.add_argument("--seglab-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=None, help="seconds of decoder training (stops early)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step, keeping the schedule of --steps (replays a time-budgeted run exactly)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="checkpoints folder (default <data>/train)")
    p.add_argument("--out", default=os.path.join(REPO, "lib", "oneprompt", "weights",
                                                 "oneprompt_litemedsam.pt"))
    p.add_argument("--only", choices=("cache", "seglab", "train", "eval"), default=None,
                   help="run the stages up to and including this one")
    p.add_argument("--eval-templates", type=int, default=None, help="templates per held-out task (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--absent-fraction", type=float, default=0.0,
                   help="share of queries drawn from slices where the task's structure is absent (empty target; "
                        "0, the default and the shipped weights: the paper's sampling, every query holds its "
                        "structure). Experimental: 0.3 did not stop whole-volume over-segmentation (README)")
    p.add_argument("--presence-weight", type=float, default=0.0,
                   help="weight of the image-level presence loss (lib.oneprompt.training.loop.presence_loss; 0, the "
                        "default and the shipped weights: off). Experimental, with --absent-fraction")
    p.add_argument("--init", default=None,
                   help="start from this weights file's decoder + prompt encoder (fine-tuning; the SegLab autoencoder "
                        "still comes from <work>/seglab.pt)")
    p.add_argument("--cache-dir", default=None, help="the package cache build_oneprompt_data.py used (default its)")
    p.add_argument("--paper-only", action="store_true",
                   help="the decoder without our two additions (prompt map on template tokens, head priors)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from lib.core.stores import atomic_write
    from lib.oneprompt.model import SegLabAutoencoder, build_oneprompt
    from lib.models.sam.build import build_litemedsam
    from lib.oneprompt import training as op

    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        print(f"{args.data}/manifest.json missing: run scripts/build_oneprompt_data.py first", file=sys.stderr)
        return 2
    work = args.work or os.path.join(args.data, "train")
    os.makedirs(work, exist_ok=True)
    store = op.SampleStore(args.data)
    cache = op.FeatureCache(args.features or os.path.join(args.data, "features"), store, views=args.views,
                            seed=args.seed)
    additions = {"prompt_map": not args.paper_only, "head_priors": not args.paper_only}
    model = build_oneprompt(**additions)
    report = {"command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
              "manifest_sha256": store.manifest_hash(), "args": vars(args)}

    # 1. feature cache
    t0 = time.perf_counter()
    report["cache"] = cache.build(model, time_budget=args.cache_budget)
    print(f"cache: {json.dumps(report['cache'])}", flush=True)
    if args.only == "cache":
        return 0

    # 2. SegLab autoencoder
    seglab_path = os.path.join(work, "seglab.pt")
    if os.path.exists(seglab_path):
        seglab = SegLabAutoencoder()
        seglab.load_state_dict(torch.load(seglab_path))
        seglab.eval()
        print(f"SegLab autoencoder loaded from {seglab_path}")
    else:
        t = time.perf_counter()
        seglab = op.train_seglab_on_store(store, cache, steps=args.seglab_steps, seed=args.seed, max_masks=300)
        op.atomic_save(seglab.state_dict(), seglab_path)
        print(f"SegLab autoencoder trained in {time.perf_counter() - t:.0f}s -> {seglab_path}")
    model.prompt_encoder.attach_seglab(seglab)
    if args.init:
        init = torch.load(args.init, weights_only=False)["decoder_and_prompt_encoder"]
        missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                     for k, v in init.items()}, strict=False)
        if unexpected or [k for k in missing if not k.startswith("image_encoder.")]:
            raise SystemExit(f"--init {args.init} does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        print(f"decoder initialised from {args.init}", flush=True)
    if args.only == "seglab":
        return 0

    # 3. decoder
    absent = {}
    if args.absent_fraction:
        absent = store.absent_queries(slice_values(args.data, store, args.cache_dir))
        report["absent_queries"] = {"tasks": len(absent), "queries": sum(len(q) for q in absent.values())}
        print(f"absent-structure queries: {report['absent_queries']}", flush=True)
    sampler = op.TaskSampler(store, seed=args.seed, absent=absent, absent_fraction=args.absent_fraction)
    source = op.PairSource(cache, None)
    config = op.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                            presence_weight=args.presence_weight,
                            time_budget=args.time_budget, stop_at=args.stop_at, seed=args.seed)
    history = op.train_decoder(model, sampler, source, config, checkpoint=os.path.join(work, "decoder.ckpt"),
                               log=lambda m: print(m, flush=True))
    losses = history["losses"]
    report["training"] = {"steps_done": history["step"], "steps_planned": args.steps, "seconds": history["seconds"],
                          "steps_per_s": history["step"] / max(history["seconds"], 1e-9),
                          "batch_size": args.batch_size, "train_tasks": len(sampler.task_list),
                          "loss_first_50": float(sum(losses[:50]) / max(1, len(losses[:50]))),
                          "loss_last_50": float(sum(losses[-50:]) / max(1, len(losses[-50:]))),
                          "losses": losses}
    if args.only == "train":
        return 0

    # 4. evaluation on held-out tasks
    sam = build_litemedsam()
    threshold = op.calibrate_prototype_threshold(store, cache, max_tasks=20)
    print(f"prototype threshold (calibrated on training tasks): {threshold}")
    t = time.perf_counter()
    result = op.evaluate(model, store, cache, sam=sam, prototype_threshold=threshold,
                         max_templates=args.eval_templates,
                         log=lambda m: print(m, flush=True))
    print(f"evaluation: {time.perf_counter() - t:.0f}s")
    table = op.markdown_table(result)
    print(table)
    report["eval_heldout"] = result
    report["eval_table"] = table

    # 5. weights
    state = {"decoder_and_prompt_encoder": op.trainable_state(model, torch.float16),
             "seglab": {k: v.half() if v.is_floating_point() else v for k, v in seglab.state_dict().items()},
             "config": {"embed_dim": 128, "levels": list(model.levels), "head_skips": list(model.head_skips),
                        **additions,
                        "encoder": "LiteMedSAM TinyViT (frozen; build_litemedsam())"},
             "steps": history["step"]}
    op.atomic_save(state, args.out)
    report["weights"] = {"path": os.path.relpath(args.out, REPO), "bytes": os.path.getsize(args.out)}
    report["total_seconds"] = time.perf_counter() - t0
    json_path = os.path.splitext(args.out)[0] + ".json"
    atomic_write(json_path, lambda f: f.write(json.dumps(report, indent=1, default=str).encode()))
    print(f"weights: {args.out} ({report['weights']['bytes']} bytes); report {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
