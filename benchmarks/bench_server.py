"""Click-to-mask over HTTP, the way Slicer sends it, against MONAI Label's own no-op request path.

Starts two servers on loopback over a temporary copy of sample-data: our app, and a reference app whose model
does nothing (benchmarks/noop_app). For each 3D sample image it sends one cold click (image load + encoder), then
refinement clicks on that object and single clicks on new objects of the same slice (cached image and
embedding), and prints p50/p95 in ms and our/reference ratios.

    .venv/bin/python benchmarks/bench_server.py [--clicks 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import Server, copy_sample_data  # noqa: E402

IMAGES = ("colin27_t1", "head_ct")


def click_points(label_path: str, count: int, seed: int = 0):
    """`count` foreground clicks inside the largest labelled structure of the middle slice (IJK)."""
    import nibabel as nib

    label = np.asarray(nib.load(label_path).dataobj)
    k = int(np.argmax((label > 0).sum(axis=(0, 1))))
    plane = label[:, :, k]
    values, counts = np.unique(plane[plane > 0], return_counts=True)
    ii, jj = np.nonzero(plane == values[np.argmax(counts)])
    picks = np.random.default_rng(seed).choice(len(ii), size=count, replace=True)
    return [[int(ii[p]), int(jj[p]), k] for p in picks]


def timed_post(url: str, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = requests.post(url, data={"params": json.dumps(params)}, timeout=300)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    body = response.headers.get("content-type", "")
    result = {} if "multipart" in body else response.json()
    return elapsed, result


def run(clicks: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_server_")
    studies = copy_sample_data(os.path.join(tmp, "studies"))
    ours = Server(studies, os.path.join(tmp, "ours.log")).start()
    reference = Server(studies, os.path.join(tmp, "noop.log"),
                       app=os.path.join(os.path.dirname(os.path.abspath(__file__)), "noop_app"), asgi=None).start()
    rows = {}
    try:
        for image in IMAGES:
            points = click_points(os.path.join(studies, "labels", "final", f"{image}.nii.gz"), clicks + 1)
            slicer = {"result_extension": ".nrrd", "result_dtype": "uint8", "background": []}
            url = f"{ours.url}/infer/litemedsam?image={image}"
            cold, _ = timed_post(url, {**slicer, "foreground": [points[0]]})
            # Refinement: Slicer resends all the object's clicks, the first one fixed, one more each time.
            refine = [timed_post(url, {**slicer, "foreground": [points[0], p]})[0] for p in points[1:]]
            # A new object on the same (cached) slice: a fresh box search in the decoder.
            new_object = [timed_post(url, {**slicer, "foreground": [p]})[0] for p in points[1:]]
            noop = [timed_post(f"{reference.url}/infer/noop?image={image}", {**slicer, "foreground": [p]})[0]
                    for p in points[1:]]
            pct = lambda values, q: float(np.percentile(values, q))
            rows[image] = {"cold_ms": cold, "refine_p50_ms": pct(refine, 50), "refine_p95_ms": pct(refine, 95),
                           "new_object_p50_ms": pct(new_object, 50), "new_object_p95_ms": pct(new_object, 95),
                           "noop_p50_ms": pct(noop, 50), "noop_p95_ms": pct(noop, 95)}
    finally:
        ours.stop()
        reference.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    rows = run(args.clicks)
    print("| image | cold click (ms) | refinement click p50 / p95 (ms) | new object, cached slice p50 / p95 (ms) "
          "| MONAI Label no-op p50 / p95 (ms) | refinement p50 / no-op p50 |")
    print("|---|---|---|---|---|---|")
    for image, r in rows.items():
        print(f"| {image} | {r['cold_ms']:.0f} | {r['refine_p50_ms']:.0f} / {r['refine_p95_ms']:.0f} | "
              f"{r['new_object_p50_ms']:.0f} / {r['new_object_p95_ms']:.0f} | "
              f"{r['noop_p50_ms']:.0f} / {r['noop_p95_ms']:.0f} | {r['refine_p50_ms'] / r['noop_p50_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
