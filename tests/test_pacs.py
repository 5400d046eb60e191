"""The app on a DICOMweb PACS (issue 15): Orthanc from Debian with its DICOMweb plugin, the sample head CT in it as a
DICOM series (scripts/pacs_data.py), and our server with `--studies` at its DICOMweb root, offline. Driven the way
Slicer's MONAI Label module drives it (series UID as the image id, IJK clicks, PUT /datastore/label, next sample).

Needs the Debian packages orthanc and orthanc-dicomweb: scripts/test.sh installs them. Without them these tests
fail and say so; they never skip.
"""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from helpers import SAMPLE_DATA, dice, start_training, wait_for_training
from lib.core.evaluation import component_targets
from lib.server.dicomweb import use_packaged_dcmqi
from pacs_helpers import pacs_data, start_app, start_orthanc

NAMES = [{"name": "head"}, {"name": "intracranial region"}]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server, series = start_orthanc(str(tmp_path_factory.mktemp("pacs")))
    assert len(os.listdir(series["head_ct"]["folder"])) == 60
    yield server, series["head_ct"]
    server.stop()


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    srv = start_app(orthanc[0], str(tmp_path_factory.mktemp("app")), conf={"dicomweb_revalidate_s": "0"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served_image(server, orthanc, tmp_path_factory):
    """The series as the server converted it (NIfTI), and the sample label carried onto that grid."""
    _, series = orthanc
    response = requests.get(f"{server.url}/datastore/image", params={"image": series["series"]}, timeout=300)
    assert response.status_code == 200, response.text
    path = tmp_path_factory.mktemp("served") / "image.nii.gz"
    path.write_bytes(response.content)
    image = sitk.ReadImage(str(path))
    label = sitk.ReadImage(os.path.join(SAMPLE_DATA, "labels", "final", "head_ct.nii.gz"))
    on_grid = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    truth = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0)  # (i, j, k), as the server indexes voxels
    return series["series"], image, on_grid, truth


def test_server_starts_offline_and_lists_the_series(server):
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["total"] == 1 and stats["completed"] == 0, stats  # listed from the PACS (QIDO-RS)
    with open(server.log_path) as f:
        log = f.read()
    assert "download" not in log.lower(), "nothing may be downloaded at start-up"


def test_the_series_keeps_its_geometry(served_image):
    """The PACS copy is the sample volume: every voxel at the same physical point."""
    _, image, _, _ = served_image
    original = sitk.ReadImage(os.path.join(SAMPLE_DATA, "head_ct.nii.gz"))
    resampled = sitk.Resample(image, original, sitk.Transform(), sitk.sitkNearestNeighbor, -5000)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(original))


def test_slicer_click_by_series_uid(server, served_image, tmp_path):
    uid, _, _, truth = served_image
    k = truth.shape[2] // 2
    target = component_targets(truth[:, :, k].T, values=[2])[0]
    r, c = target.interior_point
    response = requests.post(f"{server.url}/infer/litemedsam", params={"image": uid, "output": "image"},
                             data={"params": json.dumps({"foreground": [[int(c), int(r), k]], "background": [],
                                                         "result_extension": ".nii.gz"})}, timeout=600)
    assert response.status_code == 200, response.text
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(response.content)
    mask = np.asarray(nib.load(str(path)).dataobj)
    assert mask.shape == truth.shape
    score = dice(mask[:, :, k].T > 0, target.mask)
    print("click on the PACS series: Dice", round(score, 3))
    assert score >= 0.90  # the same click on the local NIfTI: 0.98 (tests/test_server.py)


def test_next_sample_is_a_series_of_the_pacs(server, orthanc):
    """Before any label is saved: the one unlabelled series."""
    _, series = orthanc
    response = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == series["series"]


def test_saved_label_is_a_seg_in_orthanc_with_the_same_voxels(server, orthanc, served_image, tmp_path):
    pacs_server, series = orthanc
    uid, image, on_grid, truth = served_image
    label_path = tmp_path / "label.nii.gz"
    sitk.WriteImage(sitk.Cast(on_grid, sitk.sitkUInt8), str(label_path))
    with open(label_path, "rb") as f:  # what OHIF's Submit and Slicer's "Submit label" send
        response = requests.put(f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                                data={"params": json.dumps({"label_info": NAMES})},
                                files={"label": ("label.nii.gz", f)}, timeout=600)
    assert response.status_code == 200, response.text

    segs = [s for s in requests.get(f"{pacs_server.url}/series", params={"expand": 1}, timeout=30).json()
            if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) == 1
    instance = segs[0]["Instances"][0]
    seg_file = tmp_path / "seg.dcm"
    seg_file.write_bytes(requests.get(f"{pacs_server.url}/instances/{instance}/file", timeout=60).content)
    seg = pydicom.dcmread(str(seg_file))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["series"]
    assert seg.StudyInstanceUID == series["study"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [n["name"] for n in NAMES]

    import pydicom_seg

    decoded = pydicom_seg.MultiClassReader().read(seg).image
    back = sitk.Resample(decoded, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), truth)

    # What Slicer's and OHIF's label download read: the same voxels on the image's grid, the names kept.
    assert read_back_label(server, uid, tmp_path).tolist() == truth.tolist()
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": uid, "tag": "final"}, timeout=60)
    assert [n["name"] for n in info.json()["label_info"]] == [n["name"] for n in NAMES]


def read_back_label(server, uid, tmp_path):
    response = requests.get(f"{server.url}/datastore/label", params={"label": uid, "tag": "final"}, timeout=300)
    assert response.status_code == 200, response.text
    path = tmp_path / "read-back.nii.gz"
    path.write_bytes(response.content)
    return np.asarray(nib.load(str(path)).dataobj)


def test_a_seg_added_on_the_pacs_replaces_the_cached_label(server, orthanc, served_image, tmp_path):
    """Another workstation stores a newer SEG for the series directly in the PACS: the next read gives it."""
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    pacs_server, series = orthanc
    uid, image, on_grid, truth = served_image
    only_brain = sitk.Cast(on_grid == 2, sitk.sitkUInt8)
    label_path = tmp_path / "brain.nii.gz"
    sitk.WriteImage(only_brain, str(label_path))
    use_packaged_dcmqi()
    seg_file = nifti_to_dicom_seg(series["folder"], str(label_path), [{"name": "brain"}])
    with open(seg_file, "rb") as f:
        assert requests.post(f"{pacs_server.url}/instances", data=f.read(), timeout=60).ok
    os.unlink(seg_file)

    back = read_back_label(server, uid, tmp_path)
    assert back.tolist() == (truth == 2).astype(back.dtype).tolist()
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": uid, "tag": "final"}, timeout=60)
    assert [n["name"] for n in info.json()["label_info"]] == ["brain"]


def test_labelled_series_is_not_the_next_sample(server):
    response = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60)
    assert response.status_code != 200 or response.json().get("id") is None, response.text


def panel_infer(server, model: str, uid: str, params: dict, tmp_path) -> np.ndarray:
    """POST /infer/{model} exactly as OHIF's MONAI Label panel (0.8.5) sends it: the series UID, multipart `params`
    with its fixed result fields, IJK voxel points; the answer is a raw NRRD on the viewer's voxel grid."""
    body = {**params, "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
            "restore_label_idx": False}
    response = requests.post(f"{server.url}/infer/{model}", params={"image": uid, "output": "image"},
                             files={"params": (None, json.dumps(body))}, timeout=900)
    assert response.status_code == 200, response.text
    path = tmp_path / f"{model}.nrrd"
    path.write_bytes(response.content)
    import nrrd

    return nrrd.read(str(path))[0]


def brain_click(truth):
    k = truth.shape[2] // 2
    target = component_targets(truth[:, :, k].T, values=[2])[0]
    r, c = target.interior_point
    return [int(c), int(r), k], target


@pytest.mark.parametrize("model", ["litemedsam", "litemedsam_msa"])
def test_panel_point_prompt(server, served_image, tmp_path, model):
    """Point Prompts: a foreground click; these 2D models answer on the clicked slice."""
    uid, _, _, truth = served_image
    point, target = brain_click(truth)
    mask = panel_infer(server, model, uid, {"foreground": [point], "background": []}, tmp_path)
    assert mask.shape == truth.shape and mask.dtype == np.uint8
    score = dice(mask[:, :, point[2]].T > 0, target.mask)
    print(model, "panel click Dice", round(score, 3))
    assert score >= 0.85


def test_training_from_the_pacs_then_panel_auto_segmentation(server, served_image, tmp_path):
    """The team's loop on the PACS: train from the final label saved there (the newest SEG: "brain", value 1),
    then OHIF's Auto-Segmentation, which sends no prompt and no label (params {}), segments the series with it."""
    uid, _, _, truth = served_image
    start_training(server, "litemedsam", {"label": "brain", "label_value": 1, "slices": 2})
    task, _ = wait_for_training(server, "litemedsam")
    assert task["status"] == "DONE", task
    mask = panel_infer(server, "litemedsam_auto", uid, {}, tmp_path)
    assert mask.shape == truth.shape
    score = dice(mask > 0, truth == 2)
    print("trained from the PACS SEG, then auto-segmentation from the panel: Dice", round(score, 3))
    assert score >= 0.6


def test_panel_one_prompt_register_then_segment(server, served_image, tmp_path):
    """One-Prompt from the panel: Options (mode=register, label) + one click registers a template; Options
    (template) + any click segments with it. Here segmented on slices around the template's."""
    uid, _, _, truth = served_image
    point, target = brain_click(truth)
    preview = panel_infer(server, "oneprompt", uid, {"mode": "register", "label": "brain pacs",
                                                     "foreground": [point], "background": []}, tmp_path)
    assert preview[:, :, point[2]].any() and not np.delete(preview, point[2], axis=2).any()
    k = point[2]
    mask = panel_infer(server, "oneprompt", uid, {"template": "brain pacs", "slices": [k - 5, k + 6],
                                                  "foreground": [point], "background": []}, tmp_path)
    score = dice(mask[:, :, k - 5:k + 6] > 0, truth[:, :, k - 5:k + 6] == 2)
    print("One-Prompt template on the PACS series, 11 slices: Dice", round(score, 3))
    assert score >= 0.4  # measured 0.494; One-Prompt's quality on real scans is issue 17


@pytest.mark.parametrize("image", ["../../escape", "1.2.3/../../x", "..", "a b"])
def test_ids_that_are_not_uids_are_refused(server, image):
    response = requests.post(f"{server.url}/infer/litemedsam", params={"image": image},
                             data={"params": json.dumps({"foreground": [[1, 1, 1]]})}, timeout=60)
    assert 400 <= response.status_code < 500, response.text


def test_a_series_changed_on_the_pacs_is_fetched_again(server, orthanc, tmp_path):
    """An instance removed from the series on the PACS: the server's copy follows (revalidated on every request
    here; `dicomweb_revalidate_s` in production), then the instance comes back."""
    pacs_server, series = orthanc
    instances = requests.get(f"{pacs_server.url}/series", params={"expand": 1}, timeout=30).json()
    ct = next(s for s in instances if s["MainDicomTags"]["SeriesInstanceUID"] == series["series"])
    last = ct["Instances"][0]
    saved = requests.get(f"{pacs_server.url}/instances/{last}/file", timeout=60).content
    assert requests.delete(f"{pacs_server.url}/instances/{last}", timeout=30).ok
    try:
        response = requests.get(f"{server.url}/datastore/image", params={"image": series["series"]}, timeout=300)
        assert response.status_code == 200, response.text
        path = tmp_path / "changed.nii.gz"
        path.write_bytes(response.content)
        assert nib.load(str(path)).shape[2] == 59
    finally:
        assert requests.post(f"{pacs_server.url}/instances", data=saved, timeout=60).ok
    response = requests.get(f"{server.url}/datastore/image", params={"image": series["series"]}, timeout=300)
    path.write_bytes(response.content)
    assert nib.load(str(path)).shape[2] == 60


def test_the_series_cache_is_bounded_and_downloads_once(orthanc, tmp_path):
    """The datastore itself, on the same PACS with a 1 MiB cache: a second series evicts the first; four threads
    asking for one series download it once."""
    import threading

    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

    from lib.server.dicomweb import guarded

    pacs_server, series = orthanc
    other = pacs_data.write_series("mni152_t1", str(tmp_path / "dicom"))
    pacs_server.upload(other["folder"])
    datastore = guarded(DICOMWebDatastore(DICOMwebClientX(pacs_server.dicomweb), {}, str(tmp_path / "cache")),
                        modalities="CT,MR", cache_mb=1, revalidate_s=60)
    assert set(datastore.list_images()) >= {series["series"], other["series"]}
    downloads = []
    original = datastore._download
    datastore._download = lambda uid, folder: (downloads.append(uid), original(uid, folder))
    first = datastore.get_image_uri(series["series"])
    assert os.path.exists(first)
    results = []
    threads = [threading.Thread(target=lambda: results.append(datastore.get_image_uri(other["series"])))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 4 and len(set(results)) == 1
    assert downloads == [series["series"], other["series"]]
    assert not os.path.exists(first) and not os.path.exists(first[: -len(".nii.gz")])  # evicted
    assert os.path.exists(datastore.get_image_uri(other["series"]))
    assert datastore.get_image_uri(series["series"]) == first and os.path.exists(first)  # fetched again
    requests.delete(f"{pacs_server.url}/series/" + next(
        s["ID"] for s in requests.get(f"{pacs_server.url}/series", params={"expand": 1}, timeout=30).json()
        if s["MainDicomTags"]["SeriesInstanceUID"] == other["series"]), timeout=30)


def test_with_the_pacs_down_a_cached_series_still_answers(server, orthanc, served_image, tmp_path):
    """Orthanc stops (last test of the module): the series the server has keeps answering clicks; what it would
    have to fetch is a 503 that says the PACS did not answer, not a 500."""
    pacs_server, _ = orthanc
    uid, _, _, truth = served_image
    pacs_server.stop()
    point, target = brain_click(truth)
    start = time.perf_counter()
    mask = panel_infer(server, "litemedsam", uid, {"foreground": [point], "background": []}, tmp_path)
    assert dice(mask[:, :, point[2]].T > 0, target.mask) >= 0.85
    clicked = time.perf_counter()
    response = requests.get(f"{server.url}/datastore/image", params={"image": "1.2.3.4.5"}, timeout=120)
    assert response.status_code == 503 and "PACS" in response.text, response.text
    refused = time.perf_counter()
    info = requests.get(f"{server.url}/info/", timeout=120)
    assert info.status_code == 200 and "PACS" in info.json()["datastore"]["error"], info.text
    print(f"PACS down: click {clicked - start:.1f} s, 503 {refused - clicked:.1f} s, /info {time.perf_counter() - refused:.1f} s")
