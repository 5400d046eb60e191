"""MSA adapters on the sample data: training time per epoch, adapter file size, infer latency with and without
adapters, and held-out Dice before (frozen LiteMedSAM, as the app serves it) and after, for one click, a box, and a
box with up to 5 corrective clicks (active validation). Also a depth-branch adapter on a 3D box.

    .venv/bin/python benchmarks/bench_msa.py [--structures putamen_L thalamus_L] [--json out.json]

Slices are planned as the train task plans them (lib/msa/train_task.plan_adapter_slices): of the axial slices
holding the structure, 6 evenly spread are held out, their neighbours (gap 1) left out, the rest train. Each
configuration trains from scratch with the task's defaults (20 epochs, batch 4, AdamW 3e-3 on adapters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.core.cache import EmbeddingKey  # noqa: E402
from lib.core.evaluation import dice, validate_prompts  # noqa: E402
from lib.core.cache import LRUCache  # noqa: E402
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor  # noqa: E402
from lib.core.prompts import SlicePrompt  # noqa: E402
from lib.models.sam import build_litemedsam  # noqa: E402
from lib.models.sam.adapters import AdapterSettings, adapter_state, parameter_counts, volumetric  # noqa: E402
from lib.msa.learner import AdapterLearner, AdapterTrainingSettings  # noqa: E402
from lib.msa.train_task import plan_adapter_slices  # noqa: E402
from lib.core.transforms import ModelFrame, Window, extract_slice, resize_to_model  # noqa: E402
from lib.core.images import load_image  # noqa: E402

DATA = os.path.join(REPO, "sample-data")
IMAGE, LABEL = os.path.join(DATA, "colin27_t1.nii.gz"), os.path.join(DATA, "labels", "final", "colin27_t1.nii.gz")
STRUCTURES = {"thalamus_L": 77, "putamen_L": 73}
CONFIGS = {
    "adapters, all encoder blocks (paper placement; default)": {},
    "adapters, last 2 encoder blocks": {"encoder_blocks": 2},
    "decoder adapters only": {"encoder_blocks": 0},
    "all blocks + decoder tail fully trained (paper)": {"train_decoder_tail": True},
}


class Data:
    def __init__(self, value: int):
        self.image, self.label = load_image(IMAGE), load_image(LABEL)
        _, self.intensity = self.image.intensity(None, None)
        self.value = value

    def slice(self, k: int):
        mask = extract_slice(self.label.array[:1], 2, k)[0].numpy().round() == self.value
        return self.image.normalised_slice(2, k, self.intensity), mask


def held_out_dice(model, slices, direct: bool, zoom: bool) -> dict:
    predictor = PromptPredictor(model, torch.device("cpu"), LRUCache(2 * len(slices)), ObjectMemory(),
                                PredictorSettings(zoom=zoom))
    predict = lambda s, prompt, key: predictor.predict(s, prompt, key, direct=direct)[0]
    return validate_prompts(predict, slices, np.random.default_rng(0))


def encode_ms(model, repeats: int = 3, depth: int = 1) -> float:
    x = torch.rand(depth, 3, 256, 256)
    with torch.inference_mode(), volumetric(depth):
        model.encode(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model.encode(x)
    return (time.perf_counter() - start) / repeats / depth * 1000


def decode_ms(model, repeats: int = 20) -> float:
    embedding = torch.rand(1, 256, 64, 64)
    points, labels = torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]])
    with torch.inference_mode():
        model.decode(embedding, points, labels)
        start = time.perf_counter()
        for _ in range(repeats):
            model.decode(embedding, points, labels)
    return (time.perf_counter() - start) / repeats * 1000


def train(base, data: Data, plan, adapters: AdapterSettings, depth: int = 1) -> tuple[AdapterLearner, dict]:
    learner = AdapterLearner(base, "cpu", adapters, AdapterTrainingSettings(depth=depth))
    start = time.perf_counter()
    size = data.image.spatial_shape[2]
    for p in plan:
        if p.role == "train":
            first = min(max(p.index - depth // 2, 0), size - depth)
            images, masks = zip(*(data.slice(first + d) for d in range(depth)))
            learner.add_stack(list(images), list(masks))
    prepare = time.perf_counter() - start
    result = learner.train()
    state = adapter_state(learner.model)
    return learner, {"training_slices": len(learner.stacks), "prepare_s": round(prepare, 1),
                     "train_s": round(result["seconds"], 1),
                     "s_per_epoch": round(result["seconds"] / learner.settings.epochs, 2),
                     "file_kb": round(sum(v.numel() * v.element_size() for v in state.values()) / 1024, 1),
                     "trainable_fraction": parameter_counts(learner.model)["trainable_fraction"]}


def box_volume_dice(model, data: Data, depth: int, k0: int, k1: int) -> float:
    """One 3D box over slices k0..k1 (the structure's bounding box there): each slice segmented from the box,
    the slices encoded in aligned stacks of `depth` with the depth branch, as the infer task does."""
    volume = data.label.array[0].numpy().round() == data.value
    rows_cols = [np.nonzero(extract_slice(torch.as_tensor(volume[None].astype(np.float32)), 2, k)[0].numpy())
                 for k in range(k0, k1 + 1)]
    box = (min(r.min() for r, _ in rows_cols), min(c.min() for _, c in rows_cols),
           max(r.max() for r, _ in rows_cols), max(c.max() for _, c in rows_cols))
    predictor = PromptPredictor(model, torch.device("cpu"), LRUCache(1024), ObjectMemory(), PredictorSettings(zoom=False))
    predicted, truth = [], []
    stacks = {}
    for k in range(k0, k1 + 1):
        slice_image, mask = data.slice(k)
        key = EmbeddingKey("bench", axis=2, index=k)
        if depth > 1:
            start = (k // depth) * depth
            if start not in stacks:
                frame = ModelFrame(Window.whole(tuple(slice_image.shape[-2:])), model.image_size)
                x = torch.stack([resize_to_model(data.slice(start + d)[0], frame).expand(3, -1, -1)
                                 for d in range(depth)])
                with torch.inference_mode(), volumetric(depth):
                    stacks[start] = model.encode(x)
            embedding = stacks[start][k - start:k - start + 1]
            predictor.embeddings.get_or_compute(key.at(Window.whole(mask.shape)), lambda: embedding)
        prompt = SlicePrompt(2, k, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), box)
        predicted.append(predictor.predict(slice_image, prompt, key, direct=True)[0])
        truth.append(mask)
    return dice(np.stack(predicted), np.stack(truth))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--structures", nargs="+", default=["putamen_L", "thalamus_L"], choices=sorted(STRUCTURES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = build_litemedsam()
    rows, latency = [], {}
    latency["frozen encoder ms/slice"] = round(encode_ms(base), 1)
    latency["frozen decoder ms"] = round(decode_ms(base), 1)
    for structure in args.structures:
        data = Data(STRUCTURES[structure])
        plan = plan_adapter_slices([(IMAGE, LABEL)], data.value, 2, None, 6, 1)
        held_out = [(*data.slice(p.index), 2, p.index, EmbeddingKey("held", axis=2, index=p.index)) for p in plan if p.role == "validation"]
        frozen = held_out_dice(base, held_out, direct=False, zoom=True)
        rows.append({"structure": structure, "config": "frozen LiteMedSAM (as served)", **_scores(frozen)})
        print(json.dumps(rows[-1]), flush=True)
        for name in args.configs:
            learner, stats = train(base, data, plan, AdapterSettings(**CONFIGS[name]))
            scores = held_out_dice(learner.model, held_out, direct=True, zoom=False)
            rows.append({"structure": structure, "config": name, **_scores(scores), **stats})
            print(json.dumps(rows[-1]), flush=True)
            if name == list(CONFIGS)[0] and structure == args.structures[0]:
                latency["adapted encoder ms/slice (all blocks)"] = round(encode_ms(learner.model), 1)
                latency["adapted decoder ms"] = round(decode_ms(learner.model), 1)
    # Depth branch: the putamen, last 2 encoder blocks, stacks of 3, against the same placement without it.
    data = Data(STRUCTURES[args.structures[0]])
    plan = plan_adapter_slices([(IMAGE, LABEL)], data.value, 2, None, 6, 1)
    ks = np.nonzero((data.label.array[0].numpy().round() == data.value).any((0, 1)))[0]
    k0, k1 = int(ks.min()) + 3, int(ks.max()) - 3
    depth_rows = []
    for depth in (1, 3):
        learner, stats = train(base, data, plan, AdapterSettings(encoder_blocks=2, depth_branch=depth > 1), depth)
        score = box_volume_dice(learner.model, data, depth, k0, k1)
        depth_rows.append({"structure": args.structures[0], "depth": depth, "box_3d_dice": round(score, 4),
                           "slices": k1 - k0 + 1, **stats})
        print(json.dumps(depth_rows[-1]), flush=True)
    if depth_rows:
        latency["depth-3 adapted encoder ms/slice (last 2 blocks)"] = round(encode_ms(learner.model, depth=3), 1)
    print(json.dumps(latency))
    _table(rows, depth_rows, latency)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "depth": depth_rows, "latency": latency}, f, indent=2)


def _scores(result: dict) -> dict:
    return {"one_click": result["one_click_dice"], "box": result["box_dice"],
            "box_5_clicks": result["box_then_clicks_dice"][-1], "held_out": result["slices"]}


def _table(rows, depth_rows, latency) -> None:
    print("\n| structure | configuration | 1 click | box | box + 5 clicks | trainable | file KB | s/epoch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['structure']} | {r['config']} | {r['one_click']:.3f} | {r['box']:.3f} | {r['box_5_clicks']:.3f} | "
              f"{r.get('trainable_fraction', '—')} | {r.get('file_kb', '—')} | {r.get('s_per_epoch', '—')} |")
    for r in depth_rows:
        print(f"| {r['structure']} | depth {r['depth']}: one 3D box over {r['slices']} slices | | {r['box_3d_dice']:.3f} | | "
              f"{r['trainable_fraction']} | {r['file_kb']} | {r['s_per_epoch']} |")
    print("\n" + ", ".join(f"{k}: {v}" for k, v in latency.items()))


if __name__ == "__main__":
    main()
