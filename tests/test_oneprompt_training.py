"""One-Prompt training (lib/oneprompt/training/): prompt simulation, the task sampler, augmentation alignment,
the learning-rate schedule, and a 20-step run on tiny synthetic tasks. CPU, one thread, < 60 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.oneprompt.model import OnePromptModel
from lib.models.sam import TinyViTImageEncoder
from lib.oneprompt import training as op

from oneprompt_helpers import SMALL_LEVELS, one_thread  # noqa: E402,F401  (one_thread: autouse fixture)


def disk(cx, cy, r, size=256):
    yy, xx = np.mgrid[:size, :size]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8)


def ring_shape():
    """A C-shaped mask: its centroid is outside it, its farthest-from-boundary pixel is inside."""
    m = disk(128, 128, 60) - disk(128, 128, 35)
    m[:, 128:] = 0
    return m.astype(np.uint8)


# -- prompt simulation ------------------------------------------------------------------------------------------
def test_oracle_click_is_inside_the_mask_and_box_is_tight():
    for m in (disk(80, 170, 20), ring_shape()):
        x, y = op.oracle_click(m).astype(int)
        assert m[y, x] == 1
        x0, y0, x1, y1 = op.oracle_box(m).astype(int)
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_jitter_std_scales_with_the_level_and_the_target_side():
    m = np.zeros((256, 256), np.uint8)
    m[100:140, 60:200] = 1  # 140 wide, 40 high
    rng = np.random.default_rng(0)
    centre = op.oracle_click(m)
    stds = {}
    for name in ("high", "medium", "low"):
        pts = op.jitter_points(np.repeat(centre[None], 4000, 0), m, op.JITTER_LEVELS[name], rng)
        stds[name] = (pts - centre).std(0)
        expected = op.JITTER_LEVELS[name] * np.array([140, 40])
        assert np.allclose(stds[name], expected, rtol=0.12), (name, stds[name], expected)
    assert stds["high"][0] < stds["medium"][0] < stds["low"][0]
    assert np.array_equal(op.simulate_click(m, 0.0, rng), centre)
    box = op.simulate_box(m, 0.25, rng)
    assert box[0] <= box[2] and box[1] <= box[3]


def test_doodle_points_are_inside_and_outside():
    rng = np.random.default_rng(1)
    for m in (disk(120, 100, 30), ring_shape()):
        pos, neg = op.simulate_doodle(m, 0.0, rng)
        assert len(pos) >= 2 and len(neg) >= 2
        assert all(m[int(y), int(x)] for x, y in pos)
        assert not any(m[int(y), int(x)] for x, y in neg)
        prompt = op.make_prompt("doodle", [m, m], level="oracle", rng=rng)
        assert prompt.points.shape[0] == 2 and set(prompt.labels.unique().tolist()) <= {-1, 0, 1}


# -- synthetic tasks ----------------------------------------------------------------------------------------------
def synthetic_store(n_per_task: int = 5, seed: int = 0):
    """Three training tasks (a bright disk / square / bar at task-specific places) + one held-out task."""
    rng = np.random.default_rng(seed)
    tasks = {"syn/disk/2d": {"role": "train", "modality": "MR"}, "syn/square/2d": {"role": "train", "modality": "CT"},
             "syn/bar/2d": {"role": "train", "modality": "MR"}, "syn/held/2d": {"role": "heldout", "modality": "MR"}}
    samples, images = [], {}
    for t_i, task in enumerate(tasks):
        for j in range(n_per_task):
            cx, cy = rng.integers(70, 186, 2)
            m = np.zeros((256, 256), np.uint8)
            if t_i == 0:
                m = disk(cx, cy, 25)
            elif t_i == 1:
                m[cy - 20:cy + 20, cx - 20:cx + 20] = 1
            elif t_i == 2:
                m[cy - 8:cy + 8, cx - 50:cx + 50] = 1
            else:
                m = disk(cx, cy, 15)
            img = (rng.normal(size=(1, 256, 256)) * 0.3 + 2.0 * m).astype(np.float32)
            key = f"{task}/{j}"
            images[key] = img
            split = "template" if j < 2 else ("train" if tasks[task]["role"] == "train" else "test")
            samples.append((task, split, key, m))
    return op.SampleStore.from_samples(tasks, samples, images)


def test_sampler_draws_templates_of_the_same_task_and_never_held_out_tasks():
    store = synthetic_store()
    sampler = op.TaskSampler(store, seed=0)
    assert "syn/held/2d" not in sampler.task_list
    seen_tasks, seen_kinds = set(), set()
    for _ in range(300):
        q, t, kind = sampler.draw()
        assert q.task == t.task and q.split == "train" and t.split == "template"
        assert store.role(q.task) == "train"
        seen_tasks.add(q.task)
        seen_kinds.add(kind)
    assert seen_tasks == {"syn/disk/2d", "syn/square/2d", "syn/bar/2d"}
    assert seen_kinds == {"click", "bbox", "doodle", "seglab"}
    # a held-out task asked for explicitly is still refused
    assert "syn/held/2d" not in op.TaskSampler(store, tasks=["syn/held/2d", "syn/disk/2d"]).task_list


def test_augmentation_keeps_image_and_mask_aligned():
    m = np.zeros((256, 256), np.uint8)
    m[30:70, 20:90] = 1  # off-centre, so a flip moves it
    image = (np.where(m, 3.0, 0.0) + np.random.default_rng(0).normal(size=m.shape) * 0.05)[None].astype(np.float32)
    moved = 0
    for seed in range(25):
        aug_img, aug_mask = op.augment(image, m[None], seed)
        mask = aug_mask[0].astype(bool)
        assert mask.any()
        moved += int(not np.array_equal(mask, m.astype(bool)))
        # the augmented mask still covers the augmented bright (or, if intensities were inverted, dark) region
        inside, outside = aug_img[0][mask].mean(), aug_img[0][~mask].mean()
        assert abs(inside - outside) > 1.0, (seed, inside, outside)
    assert moved >= 5  # flips (p 0.5 per axis) do move it


def test_learning_rate_warms_up_then_decays_by_a_cosine():
    f = [op.lr_factor(s, 100, 10) for s in range(100)]
    assert np.allclose(f[:10], np.arange(1, 11) / 10)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert abs(f[55] - 0.5) < 0.03 and f[-1] < 0.01


# -- a short training run ------------------------------------------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    enc = TinyViTImageEncoder(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                              window_sizes=(7, 7, 7, 7), out_chans=32)
    torch.manual_seed(1)
    return OnePromptModel(enc, embed_dim=32, levels=SMALL_LEVELS, mlp_dim=64, num_heads=2)


class MemorySource:
    """Features of each sample computed once with the (tiny) encoder: what FeatureCache.item returns."""

    def __init__(self, model, store):
        self.items = {}
        for s in store.samples:
            unit = torch.from_numpy(op.to_unit(store.images[s.image_key]))
            feats = {k: v.half() for k, v in model.encode(unit[None]).items()}
            self.items[s.index] = (feats, unit, s.mask())

    def get(self, sample, view=None):
        return self.items[sample.index]


def test_twenty_training_steps_lower_the_loss(tmp_path):
    store = synthetic_store()
    model = tiny_model()
    source = MemorySource(model, store)
    sampler = op.TaskSampler(store, kinds=("click", "bbox", "doodle"), seed=0)
    config = op.TrainConfig(steps=20, batch_size=2, lr=3e-3, warmup=3, log_every=0, checkpoint_every=10)
    ckpt = str(tmp_path / "decoder.ckpt")
    history = op.train_decoder(model, sampler, source, config, checkpoint=ckpt, log=lambda m: None)
    losses = history["losses"]
    assert len(losses) == 20 and history["step"] == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    state = torch.load(ckpt, weights_only=False)
    assert state["history"]["step"] == 20 and not any(k.startswith("image_encoder.") for k in state["model"])
    assert "prompt_encoder.seglab_query" in state["model"]  # the SegLab pooling is trained here: it is saved
    # resuming a finished run does nothing more
    again = op.train_decoder(tiny_model(), sampler, source, config, checkpoint=ckpt, log=lambda m: None)
    assert again["step"] == 20 and len(again["losses"]) == 20


def test_absent_queries_are_slices_without_the_structure_and_have_empty_targets():
    """Queries where the task's structure is absent: drawn at the asked share, only from the task's own volume and
    plane, only where the label slice has none of its value; their target is empty."""
    rng = np.random.default_rng(0)
    tasks = {"vol/disk/axial": {"role": "train", "modality": "MR", "dataset": "vol", "plane": "axial",
                                "label_value": 1},
             "vol/held/axial": {"role": "heldout", "modality": "MR", "dataset": "vol", "plane": "axial",
                                "label_value": 2}}
    samples, images, slice_values = [], {}, {}
    for j in range(8):  # slices 0-3 hold the disk (value 1); 4-7 only the held-out structure (value 2)
        key = f"vol/axial/{j}"
        m = disk(128, 128, 20) if j < 4 else np.zeros((256, 256), np.uint8)
        images[key] = (rng.normal(size=(1, 256, 256)) + m).astype(np.float32)
        slice_values[key] = [1] if j < 4 else [2]
        if j < 4:
            samples.append(("vol/disk/axial", "template" if j < 2 else "train", key, m))
        else:
            samples.append(("vol/held/axial", "template" if j < 6 else "test", key, disk(60, 60, 12)))
    images["other/axial/0"] = images["vol/axial/4"].copy()  # another volume: never a query for vol's tasks
    slice_values["other/axial/0"] = []
    store = op.SampleStore.from_samples(tasks, samples, images)
    absent = store.absent_queries(slice_values)
    assert set(absent) == {"vol/disk/axial"}  # held-out tasks never get training queries
    assert [q.image_key for q in absent["vol/disk/axial"]] == [f"vol/axial/{j}" for j in range(4, 8)]
    with pytest.raises(ValueError):
        op.TaskSampler(store, absent=absent, absent_fraction=1.0)
    sampler = op.TaskSampler(store, seed=0, absent=absent, absent_fraction=0.3)
    draws = [sampler.draw()[0] for _ in range(2000)]
    share = np.mean([isinstance(q, op.AbsentQuery) for q in draws])
    assert 0.26 < share < 0.34
    # the cache gives an absent query the image's features and an all-zero mask
    model = tiny_model()
    entry = {"features": {k: v.half() for k, v in model.encode(torch.from_numpy(op.to_unit(images["vol/axial/5"]))[None]).items()},
             "image": torch.zeros(3, 256, 256, dtype=torch.uint8), "masks": {}}
    cache = op.FeatureCache("unused", store)
    cache._memo[("vol/axial/5", 0)] = entry
    feats, _, mask = cache.item(op.AbsentQuery("vol/disk/axial", "vol/axial/5"), 0)
    assert mask.shape == (256, 256) and not mask.any() and feats is entry["features"]
    # and without absent queries the sampler draws exactly what it drew before (the shipped runs replay)
    a, b = op.TaskSampler(store, seed=3), op.TaskSampler(store, seed=3, absent=absent, absent_fraction=0.0)
    assert all(x[0] == y[0] and x[1] == y[1] for x, y in zip((a.draw() for _ in range(50)), (b.draw() for _ in range(50))))


def test_presence_loss_punishes_a_blob_on_an_empty_query_where_dice_cannot():
    """On an empty target the Dice term is saturated; the presence term is not, and it is small when right."""
    from lib.oneprompt.model.seglab import dice_loss

    empty = torch.zeros(1, 1, 64, 64)
    blob = torch.full((1, 1, 64, 64), -8.0)
    blob[..., 10:30, 10:30] = 4.0  # 400 false pixels
    blob.requires_grad_(True)
    dice_grad = torch.autograd.grad(dice_loss(blob, empty), blob)[0].abs().max()
    presence = op.presence_loss(blob, empty)
    presence_grad = torch.autograd.grad(presence, blob)[0].abs().max()
    assert presence > 3.0 and presence_grad > 1000 * dice_grad
    assert op.presence_loss(torch.full((1, 1, 64, 64), -8.0), empty) < 1e-3  # nothing drawn: no cost
    target = torch.zeros(1, 1, 64, 64)
    target[..., 10:30, 10:30] = 1
    assert op.presence_loss(blob.detach(), target) < 0.05  # the structure is there and drawn
