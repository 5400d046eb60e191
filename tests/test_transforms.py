"""Preprocessing: per-modality intensity rules and the slice/crop/resize geometry that maps masks back."""

import numpy as np
import pytest
import torch

from lib.core.transforms import (ModelFrame, ScaleIntensityByModalityd,
                            Window, compute_intensity_range, crop_window, extract_slice, labels_on_grid,
                            resize_to_model, resolve_modality, voxel_to_slice)


def test_ct_window_clips_hounsfield_units_to_unit_range():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32)
    out = ScaleIntensityByModalityd("image", output="unit")({"image": hu, "modality": "CT", "ct_window": "soft_tissue"})
    # soft tissue window: level 40, width 400 -> [-160, 240]
    np.testing.assert_allclose(out["image"], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_mr_percentile_clipping_ignores_zero_background_and_outliers():
    rng = np.random.default_rng(0)
    volume = np.zeros((40, 40, 40), dtype=np.float32)
    volume[10:30, 10:30, 10:30] = rng.uniform(100, 500, size=(20, 20, 20))
    volume[20, 20, 20] = 1e6  # a single hot voxel must not squash the contrast
    r = compute_intensity_range(volume, "MR")
    assert 100 <= r.low < 110 and 490 < r.high <= 500
    out = ScaleIntensityByModalityd("image", output="zscore")({"image": volume, "modality": "MR"})
    inside = out["image"][10:30, 10:30, 10:30]
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05


def test_rgb_is_kept_as_is_scaled_to_unit():
    image = np.full((3, 4, 4), 255, dtype=np.float32)
    out = ScaleIntensityByModalityd("image")({"image": image, "modality": "RGB"})
    assert float(out["image"].max()) == 1.0


def test_modality_resolution_prefers_request_then_metadata_then_values():
    ct_like = np.full((4, 4, 4), -1000.0)
    assert resolve_modality("mr", {}, ct_like, False) == "MR"
    assert resolve_modality(None, {"00080060": {"vr": "CS", "Value": ["CT"]}}, np.zeros((4, 4, 4)), False) == "CT"
    assert resolve_modality(None, {}, ct_like, False) == "CT"
    assert resolve_modality(None, {}, np.ones((4, 4, 4)), False) == "MR"
    assert resolve_modality(None, {}, np.ones((3, 4, 4)), True) == "RGB"
    with pytest.raises(ValueError, match="unknown modality"):
        resolve_modality("PET-CT", {}, ct_like, False)


def test_slice_extraction_puts_first_in_plane_axis_on_columns():
    volume = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    for axis in range(3):
        for index in range(volume.shape[axis + 1]):
            plane = extract_slice(volume, axis, index)
            point = [1, 2, 3]
            point[axis] = index
            point = [min(p, s - 1) for p, s in zip(point, volume.shape[1:])]
            row, col = voxel_to_slice(point, axis)
            assert plane[0, int(row), int(col)] == volume[0, point[0], point[1], point[2]]


def test_crop_resize_and_back_recovers_a_mask_exactly_enough():
    rng = np.random.default_rng(1)
    slice_shape = (181, 217)
    mask = np.zeros(slice_shape, dtype=np.float32)
    mask[60:90, 100:140] = 1
    for window in (Window.whole(slice_shape), Window(40, 80, 64, 64), Window(-20, 90, 100, 100)):
        frame = ModelFrame(window, 256)
        model_input = resize_to_model(crop_window(torch.as_tensor(mask)[None], window), frame)
        assert model_input.shape == (1, 256, 256)
        logits = model_input[0] * 2 - 1  # a "model" that returns its input as logits
        back = frame.paste(frame.logits_to_window(logits) > 0, slice_shape, fill=False).numpy()
        expected = crop_window(torch.as_tensor(mask)[None], window)[0].numpy() > 0
        expected = frame.paste(torch.as_tensor(expected), slice_shape, fill=False).numpy()
        inter = (back & expected).sum()
        dice = 2 * inter / (back.sum() + expected.sum())
        assert dice > 0.97, (window, dice)
    del rng


def test_points_and_boxes_map_into_the_model_frame():
    frame = ModelFrame(Window(10, 20, 100, 50), 256)  # scaled x2.56, then padded on the right
    xy = frame.points_to_model(np.array([[10, 20], [110, 70]]))
    np.testing.assert_allclose(xy, [[0, 0], [128, 256]], atol=1e-4)
    np.testing.assert_allclose(frame.box_to_model((10, 20, 110, 70)), [0, 0, 128, 256], atol=1e-4)


def test_labels_on_grid_follows_both_affines_with_nearest_voxels():
    label = np.zeros((6, 7, 8), np.int32)
    label[1:3, 2:5, 3] = 7
    label[4, 6, 7] = 9
    eye = np.eye(4)
    np.testing.assert_array_equal(labels_on_grid(label, eye, label.shape, eye), label)
    # a target grid shifted by (+1, -2, 0) mm: its voxel v is the label's voxel v + (1, -2, 0)
    shifted = eye.copy()
    shifted[:3, 3] = (1, -2, 0)
    out = labels_on_grid(label, eye, label.shape, shifted)
    assert out.dtype == label.dtype and (out == 7).sum() == 6 and 9 not in out  # the 9 left the grid (j = 8)
    np.testing.assert_array_equal(out[0:2, 4:7, 3], 7)
    assert not out[5].any() and not out[:, :2].any()  # outside the label's grid: 0
    # a flipped 2 mm first axis, a 2 mm second axis offset by 0.6 mm: nearest voxel (not floor), values never mixed
    coarse = np.diag([-2.0, 2.0, 1.0, 1.0])
    coarse[:3, 3] = (5, 0.6, 0)
    out = labels_on_grid(label, eye, (3, 4, 8), coarse)
    # voxel (a, b, c) -> label voxel (5 - 2a, 2b + 0.6, c): only (2, 1, 3) -> (1, 2.6 ~ 3, 3) lies in the 7s
    assert np.argwhere(out == 7).tolist() == [[2, 1, 3]] and set(np.unique(out).tolist()) == {0, 7}


def test_aal_carried_onto_the_unlabelled_mni152_sample_is_an_exact_voxel_shift():
    """Colin27 and sample-data/mni152_t1.nii.gz: both 1 mm RAS in MNI space, an integer shift apart, so nearest-voxel
    resampling moves the AAL voxels without changing them (the shared helper the tests and benchmark score with)."""
    import os

    import nibabel as nib

    from helpers import SAMPLE_DATA, aal_on_grid

    mni = nib.load(os.path.join(SAMPLE_DATA, "mni152_t1.nii.gz"))
    colin = nib.load(os.path.join(SAMPLE_DATA, "labels", "final", "colin27_t1.nii.gz"))
    aal = np.asarray(colin.dataobj).round().astype(np.int32)
    carried = aal_on_grid(mni.shape, mni.affine)
    assert carried.shape == mni.shape == (197, 233, 189)
    # voxel v here = Colin27's voxel v - (8, 9, 1)
    np.testing.assert_array_equal(carried[8:8 + 181, 9:9 + 217, 1:1 + 181], aal)
    assert carried.sum() == aal.sum()
    t1 = np.asarray(mni.dataobj).astype(np.float32)
    assert t1[carried > 0].mean() > 2 * t1[carried == 0].mean()  # the atlas lands on the second brain, not beside it
