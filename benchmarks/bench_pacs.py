"""The PACS path on the sample head CT (60 slices), as OHIF's panel drives it: time to the first mask on a series the
server has not fetched yet (DICOMweb download, DICOM to NIfTI, image load, encoder, decoder), a second click, and
Submit Label (the viewer's labelmap as `label.bin`, DICOM SEG written by dcmqi and stored in Orthanc).

References in the same run: a plain WADO-RS download of the series (dicomweb-client, into memory) for the first
mask, and a plain upload of the same SEG file to Orthanc for the save. Orthanc and the server run on loopback
(Debian's orthanc + orthanc-dicomweb; bash scripts/test.sh installs them).

    .venv/bin/python benchmarks/bench_pacs.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from tests.pacs_helpers import start_app, start_orthanc  # noqa: E402


def panel_click(server, uid: str, point: list) -> bytes:
    body = {"foreground": [point], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8",
            "result_compress": False, "restore_label_idx": False}
    response = requests.post(f"{server.url}/infer/litemedsam", params={"image": uid, "output": "image"},
                             files={"params": (None, json.dumps(body))}, timeout=900)
    response.raise_for_status()
    return response.content


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import nrrd
    from dicomweb_client import DICOMwebClient

    root = tempfile.mkdtemp(prefix="bench_pacs_")
    orthanc, series = start_orthanc(root)
    series = series["head_ct"]
    server = start_app(orthanc, root)
    uid = series["series"]
    cache = os.path.join(root, "cache")
    rows = {"wado_rs_download_s": [], "first_mask_s": [], "second_click_s": [], "stow_seg_s": [], "save_label_s": []}
    try:
        for round_ in range(args.rounds):
            for path in glob.glob(os.path.join(cache, "*", uid)) + glob.glob(os.path.join(cache, "*", uid + ".*")):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)  # the series not fetched yet
            start = time.perf_counter()
            instances = DICOMwebClient(orthanc.dicomweb).retrieve_series(series["study"], uid)
            rows["wado_rs_download_s"].append(time.perf_counter() - start)
            assert len(instances) == 60

            start = time.perf_counter()
            answer = panel_click(server, uid, [128, 120, 30])
            rows["first_mask_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            panel_click(server, uid, [128, 110, 30])
            rows["second_click_s"].append(time.perf_counter() - start)

            mask_file = os.path.join(root, "mask.nrrd")
            with open(mask_file, "wb") as f:
                f.write(answer)
            mask = nrrd.read(mask_file)[0]
            labelmap = np.asfortranarray(mask).tobytes(order="F")  # OHIF's order: i fastest, then j, then k
            start = time.perf_counter()
            response = requests.put(f"{server.url}/datastore/label", params={"image": uid},
                                    files={"params": (None, json.dumps({"label_info": [{"name": "object", "idx": 1}]})),
                                           "label": ("label.bin", labelmap)}, timeout=900)
            rows["save_label_s"].append(time.perf_counter() - start)
            response.raise_for_status()
            segs = [s for s in requests.get(f"{orthanc.url}/series", params={"expand": 1}, timeout=30).json()
                    if s["MainDicomTags"].get("Modality") == "SEG"]
            newest = max(segs, key=lambda s: (s["MainDicomTags"].get("SeriesDate", ""),
                                              s["MainDicomTags"].get("SeriesTime", ""), s["LastUpdate"]))
            seg_bytes = requests.get(f"{orthanc.url}/instances/{newest['Instances'][0]}/file", timeout=60).content
            requests.delete(f"{orthanc.url}/series/{newest['ID']}", timeout=60)
            start = time.perf_counter()
            requests.post(f"{orthanc.url}/instances", data=seg_bytes, timeout=60).raise_for_status()
            rows["stow_seg_s"].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    finally:
        server.stop()
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in rows.items()}
    print("\nmedian of", args.rounds, "rounds (s):", {k: round(v, 2) for k, v in median.items()})
    print(f"first mask / WADO-RS download: {median['first_mask_s'] / median['wado_rs_download_s']:.1f}")
    print(f"save label / plain SEG upload: {median['save_label_s'] / median['stow_seg_s']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rows, "median": median}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
