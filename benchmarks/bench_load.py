"""Many annotators on one server: click latency, /info latency, throughput and errors with 1, 4 and 8 simulated
users, once on an idle server and once while a whole-volume One-Prompt job runs.

Each user works like a Slicer/OHIF annotator on its own slices: a first click on a slice (a new embedding), then
refinement clicks on that object, then a slice of the next volume, with 1.5-3 s of think time between clicks. A poller
asks /info every second, as the panels do. The long job segments every slice of Colin27 through POST /jobs/infer
and is started again when it ends, so it runs for the whole measurement.

    .venv/bin/python benchmarks/bench_load.py [--users 1,4,8] [--seconds 60] [--json out.json] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import Server, copy_sample_data  # noqa: E402

# (image, shape) of the sample volumes; users take them in turn, each its own band of slices.
VOLUMES = (("head_ct", (256, 256, 60)), ("colin27_t1", (181, 217, 181)), ("mni152_t1", (197, 233, 189)))
LONG_JOB_IMAGE = "colin27_t1"
PUTAMEN_L = 73  # AAL's value of the left putamen (sample-data/labels/colin27_aal_names.json): the long job's template


def percentile(values, q):
    return round(float(np.percentile(values, q)), 1) if values else None


class User(threading.Thread):
    def __init__(self, url: str, number: int, stop: threading.Event, think_s=(1.5, 3.0), refinements=3):
        super().__init__(daemon=True)
        self.url, self.number, self.stop_event = url, number, stop
        self.think_s, self.refinements = think_s, refinements
        self.rng = random.Random(number)
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []

    def click(self, image: str, point):
        params = {"foreground": [point], "background": [], "label": f"user{self.number}"}
        start = time.perf_counter()
        try:
            r = requests.post(f"{self.url}/infer/litemedsam", params={"image": image, "output": "json"},
                              data={"params": json.dumps(params)}, timeout=600)
            if r.status_code != 200:
                self.errors.append(f"{r.status_code}: {r.text[:120]}")
                return
        except requests.RequestException as e:
            self.errors.append(type(e).__name__)
            return
        self.latencies_ms.append((time.perf_counter() - start) * 1000)

    def run(self):
        # Every user moves through the three volumes, one slice at a time, so that 1, 4 and 8 users do the same
        # kind of work (a first click on a slice of each volume, then refinements); users work on different slices.
        visit = 0
        while not self.stop_event.is_set():
            image, (x, y, z) = VOLUMES[(self.number + visit) % len(VOLUMES)]
            k = (z // 4 + 3 * self.number + 7 * (visit // len(VOLUMES))) % z
            visit += 1
            centre = [x // 2 + self.rng.randint(-15, 15), y // 2 + self.rng.randint(-15, 15), k]
            for n in range(1 + self.refinements):
                if self.stop_event.is_set():
                    return
                self.click(image, [centre[0] + self.rng.randint(-4, 4), centre[1] + self.rng.randint(-4, 4), k])
                self.stop_event.wait(self.rng.uniform(*self.think_s))


class InfoPoller(threading.Thread):
    def __init__(self, url: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.stop_event = url, stop
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []

    def run(self):
        while not self.stop_event.is_set():
            start = time.perf_counter()
            try:
                r = requests.get(f"{self.url}/info/", timeout=600)
                if r.status_code == 200:
                    self.latencies_ms.append((time.perf_counter() - start) * 1000)
                else:
                    self.errors.append(str(r.status_code))
            except requests.RequestException as e:
                self.errors.append(type(e).__name__)
            self.stop_event.wait(1.0)


class LongJob(threading.Thread):
    """Whole-volume One-Prompt segmentation of Colin27, started again whenever it ends."""

    def __init__(self, url: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.stop_event = url, stop
        self.completed, self.slices_done, self.errors = 0, 0, []
        self.job_id = None

    def run(self):
        params = {"template": "load_Putamen_L", "label_value": 1}
        while not self.stop_event.is_set():
            r = requests.post(f"{self.url}/jobs/infer/oneprompt", params={"image": LONG_JOB_IMAGE},
                              data={"params": json.dumps(params)}, timeout=60)
            if r.status_code != 202:
                self.errors.append(f"{r.status_code}: {r.text[:120]}")
                return
            self.job_id = r.json()["id"]
            while not self.stop_event.wait(1.0):
                status = requests.get(f"{self.url}/jobs/{self.job_id}", timeout=60).json()
                if status["status"] not in ("queued", "running"):
                    if status["status"] == "done":
                        self.completed += 1
                        self.slices_done += status["progress"]["total"] or 0
                    else:
                        self.errors.append(str(status.get("error")))
                    break
            else:
                done = requests.get(f"{self.url}/jobs/{self.job_id}", timeout=60).json()["progress"]["done"]
                self.slices_done += done
                requests.delete(f"{self.url}/jobs/{self.job_id}", timeout=60)


def register_template(url: str) -> None:
    """A One-Prompt template for the long job: Colin27's left putamen from its AAL label on its largest slice."""
    import nibabel as nib

    aal = np.asarray(nib.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           "sample-data", "labels", "final", "colin27_t1.nii.gz")).dataobj)
    k = int(np.argmax((aal == PUTAMEN_L).sum((0, 1))))
    params = {"mode": "register", "label": "load_Putamen_L", "seglab_label": "final", "seglab_value": PUTAMEN_L,
              "slice": k}
    r = requests.post(f"{url}/infer/oneprompt", params={"image": LONG_JOB_IMAGE, "output": "json"},
                      data={"params": json.dumps(params)}, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"registering the long job's template: {r.status_code} {r.text}")


def warm_up(url: str, users: int) -> None:
    """Load each image and model once (a first request is not what a team sees all day)."""
    for image, shape in VOLUMES:
        requests.post(f"{url}/infer/litemedsam", params={"image": image, "output": "json"},
                      data={"params": json.dumps({"foreground": [[shape[0] // 2, shape[1] // 2, shape[2] // 2]]})},
                      timeout=600).raise_for_status()


def scenario(url: str, users: int, seconds: float, long_job: bool) -> dict:
    stop = threading.Event()
    job = LongJob(url, stop) if long_job else None
    if job:
        job.start()
        time.sleep(5)  # the job is running before the users start
    workers = [User(url, n, stop) for n in range(users)]
    poller = InfoPoller(url, stop)
    start = time.perf_counter()
    for w in workers + [poller]:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers + [poller]:
        w.join(timeout=600)
    if job:
        job.join(timeout=120)
    elapsed = time.perf_counter() - start
    clicks = [v for w in workers for v in w.latencies_ms]
    errors = [e for w in workers + [poller] + ([job] if job else []) for e in w.errors]
    row = {"users": users, "long_job": long_job, "clicks": len(clicks), "click_p50_ms": percentile(clicks, 50),
           "click_p95_ms": percentile(clicks, 95), "info_p50_ms": percentile(poller.latencies_ms, 50),
           "info_p95_ms": percentile(poller.latencies_ms, 95), "clicks_per_s": round(len(clicks) / elapsed, 2),
           "errors": len(errors), "error_examples": errors[:3]}
    if job:
        row["long_job_slices"] = job.slices_done
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--url", help="an already running server (default: start one on a copy of sample-data)")
    parser.add_argument("--json")
    args = parser.parse_args()
    server = None
    url = args.url
    if not url:
        tmp = tempfile.mkdtemp(prefix="bench_load_")
        studies = copy_sample_data(os.path.join(tmp, "studies"))
        server = Server(studies, os.path.join(tmp, "server.log"), conf={"models_dir": os.path.join(tmp, "model")})
        url = server.start().url
    try:
        users = [int(u) for u in args.users.split(",")]
        warm_up(url, max(users))
        register_template(url)
        rows = [scenario(url, n, args.seconds, long_job) for long_job in (False, True) for n in users]
    finally:
        if server:
            server.stop()
    idle = {r["users"]: r for r in rows if not r["long_job"]}
    print("\n| users | long job | clicks | click p50 / p95 ms | p95 vs 1 user idle | /info p50 / p95 ms | "
          "clicks/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    base = idle.get(1, rows[0])["click_p95_ms"]
    for r in rows:
        ratio = round(r["click_p95_ms"] / base, 2) if r["click_p95_ms"] and base else None
        print(f"| {r['users']} | {'yes' if r['long_job'] else 'no'} | {r['clicks']} | {r['click_p50_ms']} / "
              f"{r['click_p95_ms']} | {ratio}x | {r['info_p50_ms']} / {r['info_p95_ms']} | {r['clicks_per_s']} | "
              f"{r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
