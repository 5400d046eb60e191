"""Shared test helpers: a real MONAI Label server on loopback, Dice, reading label files, AAL on another grid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import requests

from lib.core.evaluation import dice  # noqa: F401  (re-exported for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATA = os.path.join(REPO, "sample-data")
# Exported encoder graphs (lib.core.runtime), shared by every test server: each would otherwise export its own
# (~10-15 s) into its fresh models_dir. Keyed by the weights' hash, so sharing cannot mix models up.
RUNTIME_CACHE = os.path.join(REPO, "data", "runtime-cache")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_label(path: str) -> np.ndarray:
    """A label file as an array in voxel order (NIfTI, NRRD) or (X, Y) for PNG."""
    if path.endswith(".nrrd"):
        import nrrd

        return nrrd.read(path)[0]
    if path.endswith((".nii", ".nii.gz")):
        return np.asarray(nib.load(path).dataobj)
    from PIL import Image

    return np.asarray(Image.open(path)).T


def decode_multipart(response: requests.Response, tmp_path) -> tuple[dict, np.ndarray]:
    """An `output=all` answer of /infer: (its JSON, its label read from a file written under tmp_path)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = MultipartDecoder.from_response(response).parts
    result, label = None, None
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        else:
            name = disposition.split("filename=")[1].strip('"')
            path = os.path.join(tmp_path, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(part.content)
            label = read_label(path)
    return result, label


class Server:
    """`monailabel start_server` on 127.0.0.1 with our app (and our ASGI app, apps/server.py) over a copy of the
    sample data."""

    def __init__(self, studies: str, log_path: str, app: str = os.path.join(REPO, "apps"), conf: dict | None = None,
                 asgi: str | None = "apps.server:app", env: dict | None = None):
        self.studies = studies
        self.asgi = asgi  # None: MONAI Label's own ASGI app (the benchmarks' no-op reference)
        self.app = app
        # Retraining by itself is off unless a test turns it on: a test that saves labels after training a label
        # must not find another run started under it.
        self.conf = {"runtime_cache_dir": RUNTIME_CACHE, "retrain_after_new_labels": 0, **(conf or {})}
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = None

    def start(self, timeout: float = 180.0) -> "Server":
        env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "PYTHONUNBUFFERED": "1", **self.env}
        self.log = open(self.log_path, "w")
        # The `monailabel` launcher runs whichever `python` is first on PATH; name this interpreter instead.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", self.app, "--studies", self.studies,
             "--host", "127.0.0.1", "--port", str(self.port),
             *(["--uvicorn_app", self.asgi] if self.asgi else []),
             *[arg for key, value in self.conf.items() for arg in ("--conf", key, str(value))]],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout}s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            import psutil

            for child in psutil.Process(self.process.pid).children(recursive=True):  # training, scoring runs
                child.kill()
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log", None):
            self.log.close()


def aal_on_grid(shape, affine) -> np.ndarray:
    """Colin27's AAL (sample-data/labels/final/colin27_t1.nii.gz, int32 region values) carried onto another image's
    grid through both affines, nearest voxel (lib.core.transforms.geometry.labels_on_grid). For another brain in MNI space
    (sample-data/mni152_t1.nii.gz) this is an APPROXIMATE truth: AAL was drawn on Colin27. Used to score, never
    stored."""
    from lib.core.transforms.geometry import labels_on_grid

    img = nib.load(os.path.join(SAMPLE_DATA, "labels", "final", "colin27_t1.nii.gz"))
    return labels_on_grid(np.asarray(img.dataobj).round().astype(np.int32), img.affine, shape, affine)


def copy_sample_data(destination: str) -> str:
    shutil.copytree(SAMPLE_DATA, destination, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    return destination


def start_on_sample_data(root, prepare=None, conf: dict | None = None) -> Server:
    """A server on a fresh copy of the sample data under `root`, with its models (learned prompts, adapters)
    in `root`/model; `prepare(studies)` may add files to the copy first."""
    studies = copy_sample_data(os.path.join(str(root), "studies"))
    if prepare:
        prepare(studies)
    return Server(studies, os.path.join(str(root), "server.log"),
                  conf={"models_dir": os.path.join(str(root), "model"), **(conf or {})}).start()


def server_info(server: Server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()


def start_training(server: Server, model: str, params: dict) -> dict:
    response = requests.post(f"{server.url}/train/{model}", json=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_training(server: Server, model: str, timeout: float = 1200) -> tuple[dict, list[dict]]:
    """The finished task, and the model's train_stats seen in /info while it ran."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        seen.append(server_info(server)["train_stats"].get(model, {}))
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task, seen
        time.sleep(1)
    raise AssertionError(f"training did not finish in {timeout}s; server log:\n{server.tail()}")

