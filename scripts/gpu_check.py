"""The prepared GPU check: every CUDA path of the project, run once, with a small JSON + markdown report.

    bash scripts/gpu_check.sh [OUT_DIR]       # default OUT_DIR: gpu-check/ ; under 8 minutes on one GPU

Parts (each timed, each failing alone without stopping the others):
1. fixture_twin: tests/test_sam_models.py's CUDA twin of the LiteMedSAM fixture comparison (pytest);
2. encoder_decoder: the encoder (fp32, and bf16/fp16 autocast) and the decoder (1 and 5 boxes), ms on CUDA;
3. http_clicks: a server on the GPU; a first click and 10 refinement clicks on the head CT through /infer;
4. whole_volume: One-Prompt `segment` and SAMauto over 100 Colin27 slices (benchmarks/bench_volume.py), with Dice;
5. msa_epoch: one MSA adapter training epoch through POST /train/litemedsam_msa on that server.
Without CUDA every part says it was skipped and why, and the script still ends with its report (CI runs it so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

NO_CUDA = "skipped: no CUDA device (torch.cuda.is_available() is False); not measured on a GPU"


def cuda() -> bool:
    return torch.cuda.is_available()


def median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 2)


def fixture_twin() -> dict:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_sam_models.py", "-k", "cuda"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    tail = run.stdout.strip().splitlines()[-3:]
    passed = run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout
    status = "passed" if passed else ("skipped" if run.returncode in (0, 5) else "failed")
    return {"status": status, "pytest": tail}


def encoder_decoder() -> dict:
    if not cuda():
        return {"status": NO_CUDA}
    from lib.models.sam import build_litemedsam

    model = build_litemedsam(device=torch.device("cuda")).eval()
    x = torch.rand(1, 3, 256, 256, device="cuda")
    out = {"status": "ran"}
    with torch.inference_mode():
        embedding = model.encode(x)
        out["encoder_fp32_ms"] = median_ms(lambda: model.encode(x))
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                out[f"encoder_{str(dtype).split('.')[-1]}_autocast_ms"] = median_ms(lambda: model.encode(x))
        box = torch.tensor([[60.0, 50.0, 200.0, 210.0]], device="cuda")
        out["decoder_1_box_ms"] = median_ms(lambda: model.decode(embedding, boxes=box))
        out["decoder_5_boxes_ms"] = median_ms(lambda: model.decode(embedding, boxes=box.repeat(5, 1)))
    return out


def gpu_server(tmp: str):
    from tests.helpers import Server, copy_sample_data

    studies = copy_sample_data(os.path.join(tmp, "studies"))
    return Server(studies, os.path.join(tmp, "server.log"),
                  conf={"models_dir": os.path.join(tmp, "model"), "device": "cuda"}).start()


def http_clicks(server) -> dict:
    import requests

    url = f"{server.url}/infer/litemedsam?image=head_ct&output=json"
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "background": [], "label": "", "slice": 20}
    times = []
    for n in range(11):
        start = time.perf_counter()
        response = requests.post(url, data={"params": json.dumps({**params, "foreground": [[128, 100 + n, 20]]})},
                                 timeout=300)
        response.raise_for_status()
        times.append(1000 * (time.perf_counter() - start))
    device = response.json().get("device")
    return {"status": "ran", "device": device, "first_click_ms": round(times[0], 1),
            "refinement_click_p50_ms": round(statistics.median(times[1:]), 1)}


def whole_volume() -> dict:
    if not cuda():
        return {"status": NO_CUDA}
    import bench_volume
    from lib.models.sam import build_litemedsam
    from lib.oneprompt.checkpoint import DEFAULT_WEIGHTS, load_oneprompt

    with tempfile.TemporaryDirectory() as cache:
        oneprompt = bench_volume.oneprompt("eager", cache, load_oneprompt(DEFAULT_WEIGHTS, torch.device("cuda")),
                                           device="cuda")
        samauto = bench_volume.samauto("eager", cache, build_litemedsam(device=torch.device("cuda")).eval(),
                                       device="cuda")
    pick = lambda r: {k: r[k] for k in ("cold_s", "warm_s", "mean_dice")}
    return {"status": "ran", "slices": list(bench_volume.SLICES), "oneprompt": pick(oneprompt),
            "samauto": pick(samauto)}


def msa_epoch(server) -> dict:
    from tests.helpers import start_training, wait_for_training

    start = time.perf_counter()
    start_training(server, "litemedsam_msa", {"label": "Putamen_L", "label_value": 73, "encoder_blocks": 2,
                                              "epochs": 1})
    task, _ = wait_for_training(server, "litemedsam_msa", timeout=300)
    return {"status": "ran" if task["status"] == "DONE" else f"failed: {task['status']}",
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "",
             f"Device: {report['device']}; torch {report['torch']} (CUDA {report['cuda']}); {report['host']}", "",
             "| part | status | seconds | figures |", "|---|---|---:|---|"]
    for name, part in report["parts"].items():
        figures = ", ".join(f"{k} {v}" for k, v in part.items() if k not in ("status", "seconds", "error"))
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.path.join(REPO, "gpu-check"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name(0) if cuda() else "no CUDA device",
              "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "parts": {}}

    def part(name, fn, *args):
        start = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - a part that fails is reported, the others still run
            result = {"status": f"failed: {type(e).__name__}: {e}", "error": traceback.format_exc(limit=3)}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["parts"][name] = result
        print(name, json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)

    part("fixture_twin", fixture_twin)
    part("encoder_decoder", encoder_decoder)
    if cuda():
        with tempfile.TemporaryDirectory() as tmp:
            server = gpu_server(tmp)
            try:
                part("http_clicks", http_clicks, server)
                part("msa_epoch", msa_epoch, server)
            finally:
                server.stop()
    else:
        report["parts"]["http_clicks"] = {"status": NO_CUDA}
        report["parts"]["msa_epoch"] = {"status": NO_CUDA}
    part("whole_volume", whole_volume)

    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    failed = [n for n, p in report["parts"].items() if str(p["status"]).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
