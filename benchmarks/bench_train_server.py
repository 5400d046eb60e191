"""The data manager's wait: `POST /train/litemedsam` to a served learned label, through a real server on a copy of
the sample data, for 2 and 5 labelled slices (Colin27 left putamen), with and without SAMauto's SAP-Net.

    .venv/bin/python benchmarks/bench_train_server.py [SLICE_COUNT ...]   (default: 2 5)

Wall time from the POST to the task's DONE (MONAI Label starts a training subprocess that rebuilds the app, loads
the model, encodes the slices, trains, validates on 6 held-out slices, learns SAP-Net, publishes), and how much
of it was encoding and training the prompt encoder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from helpers import Server, copy_sample_data  # noqa: E402


def train(server: Server, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    requests.post(f"{server.url}/train/litemedsam", json=params, timeout=60).raise_for_status()
    while True:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if task["status"] != "DONE":
        raise RuntimeError("\n".join(task["details"]))
    learned = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["litemedsam"]["learned_prompts"]
    return wall, learned[params["label"]]


def main() -> None:
    slice_counts = [int(v) for v in sys.argv[1:]] or [2, 5]
    with tempfile.TemporaryDirectory() as root:
        studies = copy_sample_data(os.path.join(root, "studies"))
        server = Server(studies, os.path.join(root, "server.log"), conf={"models_dir": os.path.join(root, "model")}).start()
        try:
            print("| labelled slices | SAMauto too | POST → DONE, s | of which encode + train, s | held-out one click, vanilla → learned |")
            print("|---|---|---:|---:|---|")
            for slices in slice_counts:
                for auto in (False, True):
                    wall, learned = train(server, {"label": f"Putamen_L_{slices}_{auto}", "label_value": 73,
                                                   "slices": slices, "auto": auto})
                    v = learned["validation"]
                    print(f"| {slices} | {auto} | {wall:.1f} | {learned['train_seconds']:.1f} | "
                          f"{v['vanilla']['one_click_dice']:.3f} → {v['learned']['one_click_dice']:.3f} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
