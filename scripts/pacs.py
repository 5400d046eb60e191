"""The PACS set-up: Orthanc with DICOMweb on loopback, the sample volumes in it as DICOM series, their final labels
as DICOM SEG, and our app serving that DICOMweb root for OHIF (`/ohif/`) and Slicer.

    bash scripts/pacs.sh [--pacs-dir data/pacs] [--pacs-port 8042] [--port 8000] [--host 127.0.0.1]

Orthanc runs from the Debian packages `orthanc` and `orthanc-dicomweb` (scripts/pacs.sh installs them) with our own
configuration (written to PACS_DIR/orthanc.json): HTTP on 127.0.0.1 only, no DICOM port, no authentication (it
listens on loopback; put it behind your hospital's proxy otherwise), storage in PACS_DIR/storage. The studies are
loaded once (Orthanc keeps them; a second run finds them there), the series written by scripts/pacs_data.py. The
app's DICOMweb cache (MONAI Label's series downloads and their NIfTI conversion) is PACS_DIR/cache. Ctrl-C stops
both servers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_config(pacs_dir: str, port: int) -> str:
    """Write PACS_DIR/orthanc.json and return its path."""
    config = {
        "Name": "MONAI Label sample PACS",
        "StorageDirectory": os.path.join(pacs_dir, "storage"),
        "IndexDirectory": os.path.join(pacs_dir, "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # DICOMweb only: no DIMSE port to open
        "HttpCompressionEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": "127.0.0.1", "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "StableAge": 1,
    }
    os.makedirs(config["StorageDirectory"], exist_ok=True)
    path = os.path.join(pacs_dir, "orthanc.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


class Orthanc:
    """Orthanc on 127.0.0.1:port with our configuration, as a child process."""

    def __init__(self, pacs_dir: str, port: int = 8042):
        self.pacs_dir, self.port = os.path.abspath(pacs_dir), port
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.process = None

    def start(self, timeout: float = 60) -> "Orthanc":
        if not os.path.exists(DICOMWEB_PLUGIN):
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing: install the Debian packages orthanc and "
                               f"orthanc-dicomweb (scripts/pacs.sh does)")
        config = orthanc_config(self.pacs_dir, self.port)
        self.log = open(os.path.join(self.pacs_dir, "orthanc.log"), "w")
        self.process = subprocess.Popen(["Orthanc", config], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log", None):
            self.log.close()

    def series_uids(self) -> set[str]:
        response = requests.get(f"{self.dicomweb}/series", timeout=30)
        response.raise_for_status()
        return {s["0020000E"]["Value"][0] for s in (response.json() if response.content else [])}

    def upload(self, folder: str) -> int:
        """POST every .dcm of a folder to Orthanc's REST API; returns how many were stored."""
        stored = 0
        for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
            with open(path, "rb") as f:
                response = requests.post(f"{self.url}/instances", data=f.read(), timeout=60)
            response.raise_for_status()
            stored += 1
        return stored


def load_sample_studies(orthanc: Orthanc, pacs_dir: str) -> dict:
    """The sample volumes as DICOM series in Orthanc (written and uploaded when Orthanc does not have them)."""
    import pacs_data

    dicom_dir = os.path.join(pacs_dir, "dicom")
    present = orthanc.series_uids()
    series = {}
    for name in pacs_data.VOLUMES:
        uid = pacs_data.uid(name, "series")
        if uid not in present:
            info = pacs_data.write_series(name, dicom_dir)
            print(f"PACS: {name}: {orthanc.upload(info['folder'])} instances stored", flush=True)
        series[name] = uid
    return series


def save_final_labels(app_url: str, series: dict) -> None:
    """The labelled sample volumes' final labels as DICOM SEG in the PACS, through the app's label save (OHIF's
    Submit path): skipped for a series that already has one."""
    import pacs_data

    with open(os.path.join(REPO, "sample-data", "labels", "colin27_aal_names.json")) as f:
        aal = {int(k): v for k, v in json.load(f).items()}
    names = {"colin27_t1": aal, "head_ct": {1: "head", 2: "intracranial region"}}
    for name, uid in series.items():
        label_file = pacs_data.VOLUMES[name][4]
        if not label_file:
            continue
        if requests.head(f"{app_url}/datastore/label", params={"image": uid, "tag": "final"}, timeout=600).ok:
            continue  # a SEG on the PACS references the series already
        label_info = [{"name": n} for _, n in sorted(names[name].items())]
        with open(os.path.join(REPO, "sample-data", "labels", "final", label_file), "rb") as f:
            response = requests.put(f"{app_url}/datastore/label", params={"image": uid, "tag": "final"},
                                    data={"params": json.dumps({"label_info": label_info})},
                                    files={"label": (label_file, f)}, timeout=600)
        print(f"PACS: {name}: final label saved as DICOM SEG: HTTP {response.status_code}", flush=True)
        response.raise_for_status()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pacs-dir", default=os.path.join(REPO, "data", "pacs"))
    p.add_argument("--pacs-port", type=int, default=8042)
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    args, extra = p.parse_known_args(argv)
    os.makedirs(args.pacs_dir, exist_ok=True)
    orthanc = Orthanc(args.pacs_dir, args.pacs_port).start()
    print(f"PACS: Orthanc at {orthanc.url} (DICOMweb {orthanc.dicomweb}/)", flush=True)
    server = None
    try:
        series = load_sample_studies(orthanc, args.pacs_dir)
        env = {**os.environ, "MONAI_LABEL_DICOMWEB_CACHE_PATH": os.path.join(os.path.abspath(args.pacs_dir), "cache")}
        server = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", "apps", "--studies", orthanc.dicomweb,
             "--uvicorn_app", "apps.server:app", "--host", args.host, "--port", str(args.port), *extra],
            cwd=REPO, env=env)
        app_url = f"http://127.0.0.1:{args.port}"
        deadline = time.time() + 180
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"{app_url}/info/", timeout=5).ok:
                    break
            except requests.RequestException:  # not listening yet, or still starting
                time.sleep(0.5)
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with {server.returncode}")
        save_final_labels(app_url, series)
        print(f"\nOHIF: http://{args.host}:{args.port}/ohif/   (studies from {orthanc.dicomweb}/)\n", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
