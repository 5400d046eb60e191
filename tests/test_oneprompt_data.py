"""One-Prompt training data (lib/oneprompt/dataset.py) on the committed sample data only: no network, no cache.

The mask rule (split per class, dissect components, drop < 100 px at 256 x 256), per-modality normalisation as the
supplement says, held-out tasks never in the training split, determinism, shapes and dtypes. About 15-25 s.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.oneprompt import dataset as op
from lib.core.transforms.intensity import CT_WINDOWS

torch.set_num_threads(1)

AAL_SUBSET = {"Putamen_L", "Putamen_R", "Caudate_L", "Caudate_R", "Hippocampus_L", "Precentral_R"}


@pytest.fixture(scope="module")
def specs():
    found = {s.name: s for s in op.dataset_catalogue()}  # sample data only: no cache_dir
    assert set(found) == {"colin27_aal", "head_ct", "nuclei_dsb", "retina_fov"}
    return found


@pytest.fixture(scope="module")
def ct_build(specs):
    return op.build_dataset(specs["head_ct"])


@pytest.fixture(scope="module")
def aal_build(specs):
    return op.build_dataset(specs["colin27_aal"], structures=AAL_SUBSET)


# --- mask rule ------------------------------------------------------------------------------------------------------


def square(label, r0, c0, side, value):
    label[r0:r0 + side, c0:c0 + side] = value


def test_split_targets_dissects_components_and_drops_small_masks():
    label = np.zeros((256, 256), np.int32)
    square(label, 10, 10, 15, 1)    # class 1: 225 px
    square(label, 100, 100, 7, 1)   # class 1: 49 px, another component
    square(label, 200, 10, 12, 2)   # class 2: 144 px, one component
    square(label, 200, 100, 9, 3)   # class 3: 81 px < 100
    label[150:160, 150:160] = 4     # class 4: two diagonal-touching squares = one 8-connected component
    label[160:170, 160:170] = 4
    targets = op.split_targets(label, [1, 2, 3, 4])
    by_value = {}
    for t in targets:
        by_value.setdefault(t.value, []).append(t)
    assert set(by_value) == {1, 2, 4}  # class 3 dropped (81 px)
    (t1,) = by_value[1]  # the 49-px component dropped, the 225-px one kept as its own mask
    assert (t1.area, t1.component, t1.n_components) == (225, 0, 2)
    m = t1.mask(256)
    assert m.dtype == np.uint8 and m.sum() == 225 and m[10:25, 10:25].all()
    (t2,) = by_value[2]
    assert (t2.area, t2.component, t2.n_components) == (144, 0, 1)
    (t4,) = by_value[4]
    assert t4.area == 200 and t4.n_components == 1

    # Without dissection the multi-component class is kept whole (225 + 49 px).
    whole = {t.value: t for t in op.split_targets(label, [1, 2, 3, 4], dissect=False)}
    assert whole[1].area == 274 and whole[1].n_components == 1

    # Two big components: both kept, largest first.
    square(label, 100, 100, 12, 1)
    parts = [t for t in op.split_targets(label, [1]) if t.value == 1]
    assert [(t.area, t.component, t.n_components) for t in parts] == [(225, 0, 2), (144, 1, 2)]


def test_split_targets_instances_stay_apart():
    label = np.zeros((256, 256), np.int32)
    square(label, 50, 50, 12, 7)    # two touching nuclei: one component, two instances
    square(label, 50, 62, 12, 9)
    square(label, 150, 150, 5, 3)   # 25 px: dropped
    targets = op.split_targets(label, None, instances=True)
    assert sorted((t.instance, t.area) for t in targets) == [(7, 144), (9, 144)]
    assert all(t.value == 1 and t.n_components == 3 for t in targets)
    (whole,) = op.split_targets(label, None, dissect=False, instances=True)
    assert (whole.value, whole.instance, whole.area, whole.n_components) == (1, 0, 313, 1)


def test_built_masks_are_single_components_of_at_least_100_px(ct_build, aal_build):
    seen_dissected = False
    for build in (ct_build, aal_build):
        for s in build.samples():
            assert s.area == int(s.mask.sum()) >= op.MIN_AREA
            _, n = ndimage.label(s.mask, structure=np.ones((3, 3)))
            assert n == 1, (s.task, s.slice_index)
            seen_dissected |= s.n_components > 1
    assert seen_dissected  # the skull splits into pieces on the lowest slices


# --- normalisation --------------------------------------------------------------------------------------------------


def test_ct_is_windowed_then_z_scored(specs):
    spec = specs["head_ct"]
    out = op.volume_transforms(spec)({**spec.inputs, "norm": spec.norm, "ct_window": spec.ct_window})
    hu = np.asarray(nib.load(spec.inputs["image"]).dataobj, dtype=np.float32)
    level, width = CT_WINDOWS["soft_tissue"]
    windowed = np.clip(hu, level - width / 2, level + width / 2)
    expected = (windowed - windowed.mean()) / windowed.std()
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).numpy()[0]
    assert image.shape == hu.shape  # CT air is -1024 HU, not zero: nothing to crop
    np.testing.assert_allclose(image, expected, atol=2e-4)
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3


def test_mr_is_percentile_clipped_then_z_scored(specs):
    spec = specs["colin27_aal"]
    out = op.volume_transforms(spec)({**spec.inputs, "norm": spec.norm, "ct_window": None})
    raw = np.asarray(nib.load(spec.inputs["image"]).dataobj, dtype=np.float32)
    # The rule, written out: the non-zero region is < 75% of the volume, so statistics come from it; clip to its
    # 0.5th-99.5th percentiles, then (x - mean) / std of the clipped region.
    sample = raw.reshape(-1)[:: max(1, raw.size // 2_000_000)]
    foreground = sample[sample != 0]
    assert foreground.size <= 0.75 * sample.size
    low, high = np.percentile(foreground, [0.5, 99.5])
    clipped = np.clip(foreground, low, high)
    mean, std = clipped.mean(), clipped.std()
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).numpy()[0]
    start = [int(v) for v in out["foreground_start_coord"]]
    crop = raw[tuple(slice(s, s + n) for s, n in zip(start, image.shape))]
    assert image.shape != raw.shape  # cropped to the non-zero bounding box
    np.testing.assert_allclose(image, (np.clip(crop, low, high) - mean) / std, atol=2e-4)
    z = image[crop != 0]
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    assert image.min() == pytest.approx((low - mean) / std, abs=1e-4)
    assert image.max() == pytest.approx((high - mean) / std, abs=1e-4)


# --- tasks and splits -----------------------------------------------------------------------------------------------


def test_slicing_axes_follow_the_supplement():
    assert op.slicing_axes((0.957, 0.957, 1.5)) == (2,)
    assert op.slicing_axes((1.5, 1.0, 1.0)) == (0,)
    assert op.slicing_axes((1.0, 2.0, 1.0)) == (1,)
    assert op.slicing_axes((1.0, 1.0, 1.0)) == (2,)  # isotropic: the (z, y, x) trailing axes span the slice
    assert op.slicing_axes((1.0, 1.0, 1.0), "all") == (0, 1, 2)


def test_heldout_tasks_never_reach_the_training_split(specs, aal_build):
    catalogue = op.task_catalogue(specs.values())
    roles = {t.id: t.role for t in catalogue}
    assert roles["colin27_aal/Putamen_L/axial"] == roles["colin27_aal/Putamen_R/axial"] == "heldout"
    assert roles["colin27_aal/Caudate_L/axial"] == "train"
    assert roles["nuclei_dsb/nucleus/2d"] == "heldout"
    assert roles["head_ct/bone/axial"] == roles["head_ct/intracranial_soft_tissue/axial"] == "train"
    # Both hemispheres of every AAL structure fall on the same side.
    families = {}
    for t in catalogue:
        if t.dataset == "colin27_aal":
            families.setdefault(op.structure_family(t.structure), set()).add(t.role)
    assert all(len(r) == 1 for r in families.values())
    heldout = {t for t, r in roles.items() if r == "heldout"}
    assert len(heldout) >= 10 and len(heldout) < len(roles) // 4

    nuclei = op.build_dataset(specs["nuclei_dsb"])
    for build in (aal_build, nuclei):
        assert {t.id for t in build.tasks} <= set(roles)
        for s in build.samples():
            if s.task in heldout:
                assert s.split in ("template", "test")
            else:
                assert s.split in ("template", "train")
        for task, counts in build.counts().items():
            assert counts["template"] == op.N_TEMPLATES
            assert 1 <= counts["train"] + counts["test"] <= op.MAX_PER_TASK - op.N_TEMPLATES
    assert {t.id for t in aal_build.tasks} == {f"colin27_aal/{s}/axial" for s in AAL_SUBSET}


def test_templates_are_separate_from_queries(aal_build):
    by_task = {}
    for p in aal_build.plans:
        by_task.setdefault(p.task, {}).setdefault(p.split, []).append(p)
    for task, splits in by_task.items():
        templates = {(p.image_key, p.component, p.instance) for p in splits["template"]}
        queries = [p for s, ps in splits.items() if s != "template" for p in ps]
        assert not templates & {(p.image_key, p.component, p.instance) for p in queries}
        # On a volume the queries avoid the templates' slices.
        assert not {p.image_key for p in splits["template"]} & {p.image_key for p in queries}


# --- determinism, shapes, shards ------------------------------------------------------------------------------------


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def test_builder_is_deterministic_and_shards_round_trip(specs, ct_build, tmp_path):
    again = op.build_dataset(specs["head_ct"])
    assert digest(again.shard_arrays()) == digest(ct_build.shard_arrays())
    other_seed = op.build_dataset(specs["head_ct"], seed=1)
    assert [p.image_key for p in other_seed.plans] != [p.image_key for p in ct_build.plans]

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    op.save_shard(str(a), ct_build.shard_arrays())
    op.save_shard(str(b), again.shard_arrays())
    assert a.read_bytes() == b.read_bytes()
    built = list(ct_build.samples())
    read = list(op.iter_shard_samples(str(a)))
    assert len(read) == len(built) == 24
    for x, y in zip(built, read):
        assert (x.task, x.split, x.slice_index, x.component, x.area, x.image_key) == (
            y.task, y.split, y.slice_index, y.component, y.area, y.image_key)
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
    assert [s.split for s in op.iter_shard_samples(str(a), split="template")] == ["template"] * 4


def test_sample_shapes_and_dtypes(specs, ct_build):
    samples = list(ct_build.samples())
    assert {s.task for s in samples} == {"head_ct/bone/axial", "head_ct/intracranial_soft_tissue/axial"}
    for s in samples:
        assert s.image.shape == (3, 256, 256) and s.image.dtype == np.float32
        assert np.array_equal(s.image[0], s.image[1]) and np.array_equal(s.image[0], s.image[2])
        assert s.mask.shape == (256, 256) and s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1}
        assert s.axis == 2 and s.source == "sample-data/head_ct.nii.gz" and 0 <= s.slice_index < 60
        assert np.isfinite(s.image).all()

    # A 2D RGB image keeps its colours; its single field-of-view mask is too few for a template + a query.
    retina = op.build_dataset(specs["retina_fov"])
    assert not retina.plans and "retina_fov/field_of_view/2d" in retina.dropped
    (s,) = op.build_dataset(specs["retina_fov"], n_templates=0).samples()
    assert s.image.shape == (3, 256, 256) and s.image.dtype == np.float32
    assert not np.array_equal(s.image[0], s.image[1])
    assert s.axis is None and s.slice_index == -1 and s.split == "train" and s.area > 0.5 * 256 * 256
