#!/usr/bin/env python
"""Build the multi-task 2D training data for a One-Prompt model (lib/oneprompt/dataset.py) into .npz shards.

    python scripts/build_oneprompt_data.py                      # fetch what is missing, build data/oneprompt/
    python scripts/build_oneprompt_data.py --no-fetch            # sample data + whatever the cache already holds
    python scripts/build_oneprompt_data.py --datasets head_ct nuclei_dsb --out /tmp/op

Sources: the committed sample data (Colin27 T1 + AAL, head CT + derived labels, DSB nuclei, retina + derived field of
view) and registry packages fetched into the cache folder, each extracted file checked against a pinned SHA-256:
  * PyPI    nilearn 0.14.1            (pip download --no-deps; read with zipfile, never installed): ICBM152 2009a T1
                                      and its grey/white-matter probability maps
  * Debian  mricron-data 1.2.20211006+dfsg-4 (apt-get download + dpkg-deb -x; run `apt-get update` first): INIA19
                                      macaque T1 and its NeuroMaps atlas
Output (the folder is generated, not committed): one shard `<dataset>.npz` per data set and `manifest.json` (tasks,
split, counts per task, sources, licences, SHA-256 of every input and shard, the parameters). Deterministic: the same
inputs and parameters give byte-identical shards and manifest (nothing depends on the clock; the build time is only
printed). Needs numpy, scipy, torch, monai, nibabel, Pillow (the project's environment).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.oneprompt import dataset as op  # noqa: E402

FORMAT = "oneprompt-2d/1"
SHARD_FORMAT = {
    "images": "(n_images, C, S, S) float32, z-scored slices; C = 1 (grey: replicate x3 when reading) or 3 (RGB)",
    "image_keys": "(n_images,) str, '<dataset>/<plane>/<slice index>' (-1 for 2D images)",
    "masks_bits": "(n_samples, S, S/8) uint8, np.packbits(mask, axis=-1); np.unpackbits(..., axis=-1, count=S)",
    "sample_image": "(n_samples,) int32, row of `images`",
    "sample_task": "(n_samples,) str, task id '<dataset>/<structure>/<plane>'",
    "sample_split": "(n_samples,) str, train | template | test",
    "sample_slice": "(n_samples,) int32, slice index in the cropped volume (-1 for 2D)",
    "sample_axis": "(n_samples,) int8, voxel axis sliced across (-1 for 2D)",
    "sample_instance": "(n_samples,) int32, instance id (instance labels), else 0",
    "sample_component": "(n_samples,) int16, rank of the dissected component (0 = largest or not dissected)",
    "sample_n_components": "(n_samples,) int16, components (instances) of the class on that slice",
    "sample_area": "(n_samples,) int32, mask pixels",
    "source": "() str, the image file",
    "reader": "lib.oneprompt.dataset.iter_shard_samples(path, split=..., tasks=...)",
}
# Where the committed sample data came from (sample-data/README.md; scripts/prepare_sample_data.py rebuilds it).
SAMPLE_DATA_PACKAGES = {
    "colin27_aal": "Debian mricron-data 1.2.20211006+dfsg-4 (ch2.nii.gz, aal.nii.gz), BSD-3-Clause",
    "head_ct": "Debian invesalius-examples 3.1.99998-4 (Cranium.inv3), GPL-2; labels derived by sample-data script",
    "nuclei_dsb": "PyPI stardist 0.9.2 (img2d.tif, mask2d.tif), package BSD-3-Clause, data CC0 1.0 (BBBC038)",
    "retina_fov": "PyPI scikit-image 0.26.0 (retina.jpg), package BSD-3-Clause, image CC0 1.0; label derived",
}
PACKAGE_LICENCES = {"nilearn": "BSD-3-Clause (wheel METADATA License-Expression)",
                    "mricron-data": "BSD-3-Clause (Debian copyright, 'Files: *')"}


def run(cmd: list[str], cwd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch(cache: str, verify: bool, allow_download: bool) -> dict:
    """Download and unpack the registry packages into `cache` (reused when present); returns package info."""
    os.makedirs(cache, exist_ok=True)
    packages = {}
    for pkg, version in op.WHEELS.items():
        stem = pkg.replace("-", "_")
        wheels = glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl"))
        if not wheels and allow_download:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", cache,
                 f"{pkg}=={version}"], cwd=cache)
            wheels = glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl"))
        if not wheels:
            print(f"missing: {pkg}=={version} wheel (skipped: its data sets are left out)")
            continue
        source = f"wheel:{pkg}"
        root = op.package_root(cache, source)
        members = [rel for s, rel, _ in op.EXTRA_INPUTS.values() if s == source]
        if not all(os.path.isfile(os.path.join(root, m)) for m in members):
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(root, members)
        packages[pkg] = {"registry": "PyPI", "version": version, "file": os.path.basename(wheels[0]),
                         "sha256": op.sha256_file(wheels[0]), "licence": PACKAGE_LICENCES.get(pkg, "see package")}
    for pkg, version in op.DEBS.items():
        debs = [d for d in glob.glob(os.path.join(cache, f"{pkg}_*.deb"))
                if os.path.basename(d).startswith(f"{pkg}_{version.split(':')[-1]}_")]
        if not debs and allow_download:
            try:
                run(["apt-get", "download", f"{pkg}={version}"], cwd=cache)
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                print(f"apt-get download {pkg}={version} failed (run `apt-get update` first?): {e}")
            debs = [d for d in glob.glob(os.path.join(cache, f"{pkg}_*.deb"))
                    if os.path.basename(d).startswith(f"{pkg}_{version.split(':')[-1]}_")]
        if not debs:
            print(f"missing: Debian {pkg}={version} (skipped: its data sets are left out)")
            continue
        source = f"deb:{pkg}"
        root = op.package_root(cache, source)
        members = [rel for s, rel, _ in op.EXTRA_INPUTS.values() if s == source]
        if not all(os.path.isfile(os.path.join(root, m)) for m in members):
            run(["dpkg-deb", "-x", debs[0], root], cwd=cache)
        packages[pkg] = {"registry": "Debian", "version": version, "file": os.path.basename(debs[0]),
                         "sha256": op.sha256_file(debs[0]), "licence": PACKAGE_LICENCES.get(pkg, "see package")}
    for name, (source, rel, digest) in op.EXTRA_INPUTS.items():
        path = op.extra_input_path(cache, name)
        if not os.path.isfile(path):
            continue
        actual = op.sha256_file(path)
        if actual != digest:
            msg = f"{name}: SHA-256 {actual} differs from the expected {digest} ({source}:{rel})"
            if verify:
                raise SystemExit(msg + " (use --no-verify to build from it anyway)")
            print("WARNING:", msg)
    return packages


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "data", "oneprompt"), help="output folder (git-ignored)")
    ap.add_argument("--cache", default=op.DEFAULT_CACHE, help="where downloaded packages are kept and reused")
    ap.add_argument("--sample-data", default=op.SAMPLE_DATA)
    ap.add_argument("--no-fetch", action="store_true", help="download nothing: use what the cache already holds")
    ap.add_argument("--no-verify", action="store_true", help="build even if an input's SHA-256 differs")
    ap.add_argument("--datasets", nargs="*", help="build only these data sets (default: all available)")
    ap.add_argument("--seed", type=int, default=op.SEED)
    ap.add_argument("--size", type=int, default=op.SIZE)
    ap.add_argument("--min-area", type=int, default=op.MIN_AREA, help="drop masks under this many px at size^2")
    ap.add_argument("--max-per-task", type=int, default=op.MAX_PER_TASK, help="samples per task, templates included")
    ap.add_argument("--templates", type=int, default=op.N_TEMPLATES, help="template samples per task")
    ap.add_argument("--axes", choices=("supplement", "all"), default="supplement",
                    help="slice across the coarsest axis (supplement, default) or across all three")
    ap.add_argument("--no-dissect", action="store_true", help="keep multi-component class masks whole (instance labels: one mask of all instances)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    packages = fetch(args.cache, not args.no_verify, not args.no_fetch)
    specs = op.dataset_catalogue(args.sample_data, args.cache)
    if args.datasets:
        unknown = set(args.datasets) - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"unknown or unavailable data sets: {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s.name in args.datasets]
    os.makedirs(args.out, exist_ok=True)
    old_manifest = os.path.join(args.out, "manifest.json")
    if os.path.isfile(old_manifest):  # shards of the previous build that this one will not rewrite
        with open(old_manifest) as f:
            for shard in json.load(f).get("shards", []):
                path = os.path.join(args.out, shard["file"])
                if os.path.isfile(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(args.out):
                    os.remove(path)

    params = {"size": args.size, "min_area": args.min_area, "max_per_task": args.max_per_task,
              "n_templates": args.templates, "seed": args.seed, "axes": args.axes, "dissect": not args.no_dissect}
    tasks, datasets, shards, dropped = [], [], [], {}
    totals = {s: 0 for s in op.SPLITS}
    for spec in specs:
        t = time.perf_counter()
        build = op.build_dataset(spec, size=args.size, min_area=args.min_area, max_per_task=args.max_per_task,
                                 n_templates=args.templates, seed=args.seed, axes=args.axes,
                                 dissect=not args.no_dissect)
        counts = build.counts()
        for task in build.tasks:
            tasks.append({**task.as_dict(), "counts": counts[task.id], "candidates": build.candidates[task.id]})
            for s in op.SPLITS:
                totals[s] += counts[task.id][s]
        dropped.update(build.dropped)
        shard = f"{spec.name}.npz"
        if build.plans:
            arrays = build.shard_arrays()
            path = os.path.join(args.out, shard)
            op.save_shard(path, arrays)
            shards.append({"file": shard, "dataset": spec.name, "sha256": op.sha256_file(path),
                           "bytes": os.path.getsize(path), "n_images": int(arrays["images"].shape[0]),
                           "n_samples": int(len(build.plans))})
        datasets.append({
            "name": spec.name, "modality": spec.modality, "normalisation": spec.norm, "ct_window": spec.ct_window,
            "classes": {str(k): v for k, v in spec.classes.items()}, "instances": spec.instances,
            "label_kind": spec.label_kind, "licence": spec.licence,
            "inputs": {role: {"origin": spec.origins[role], "sha256": op.sha256_file(path)}
                       for role, path in spec.inputs.items()},
            "shape_after_crop": list(build.shape), "spacing_mm": list(build.spacing) if build.spacing else None,
            "planes": sorted({task.plane for task in build.tasks}), "tasks": len(build.tasks),
            "samples": len(build.plans), "shard": shard if build.plans else None})
        print(f"{spec.name:18s} {len(build.tasks):4d} tasks {len(build.plans):5d} samples "
              f"{len(build.dropped):3d} dropped  {time.perf_counter() - t:6.1f} s", flush=True)

    roles = {}
    for task in tasks:
        roles.setdefault(task["role"], []).append(task["id"])
    manifest = {
        "format": FORMAT,
        "description": "One-Prompt multi-task 2D data (supplement 1.2 preprocessing); see lib/oneprompt/dataset.py",
        "parameters": params,
        "split": {
            "heldout_aal_structures": list(op.HELDOUT_AAL), "heldout_datasets": list(op.HELDOUT_DATASETS),
            "rationale": op.HELDOUT_RATIONALE,
            "templates": f"{args.templates} per task, seeded draw among the task's candidates of at least median area",
            "queries": "evenly spread over the other candidates (slice order), avoiding the templates' images; "
                       "split 'train' for training tasks, 'test' for held-out ones",
            "train_tasks": roles.get("train", []), "heldout_tasks": roles.get("heldout", [])},
        "totals": {**totals, "samples": sum(totals.values()), "tasks": len(tasks),
                   "train_tasks": len(roles.get("train", [])), "heldout_tasks": len(roles.get("heldout", [])),
                   "images": sum(s["n_images"] for s in shards), "bytes": sum(s["bytes"] for s in shards)},
        "packages": packages,
        "sample_data_packages": {k: v for k, v in SAMPLE_DATA_PACKAGES.items() if k in {d.name for d in specs}},
        "datasets": datasets,
        "tasks": tasks,
        "dropped_tasks": dropped,
        "shards": shards,
        "shard_format": SHARD_FORMAT,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    print(f"\n{'task':58s} {'role':8s} {'train':>5s} {'tmpl':>5s} {'test':>5s} {'cands':>6s}")
    for task in tasks:
        c = task["counts"]
        print(f"{task['id']:58s} {task['role']:8s} {c['train']:5d} {c['template']:5d} {c['test']:5d} "
              f"{task['candidates']:6d}")
    for task_id, why in dropped.items():
        print(f"dropped {task_id}: {why}")
    tot = manifest["totals"]
    print(f"\n{tot['tasks']} tasks ({tot['train_tasks']} train, {tot['heldout_tasks']} held out); "
          f"{tot['samples']} samples: {tot['train']} train, {tot['template']} template, {tot['test']} test; "
          f"{tot['images']} distinct slices; {human(tot['bytes'])} in {len(shards)} shards "
          f"({os.path.relpath(args.out)}); {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
