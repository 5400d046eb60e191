"""SAMassist through the server, as a data manager and a clinician use it: train from two labelled slices with
`POST /train/litemedsam`, follow it in `GET /train/` and `/info`, then click on other slices; and the runs that go
wrong (a bad request, a stopped run) leave serving as it was.

Thresholds are below what was measured on this data (see comments and the README's SAMassist table).
"""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import requests

import helpers
from helpers import dice, server_info, start_on_sample_data
from lib.core.evaluation import Target
from lib.sammed.samassist import select_training_slices

MODEL = "litemedsam"
IMAGE = "colin27_t1"
PUTAMEN_L = 73  # AAL value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_on_sample_data(tmp_path_factory.mktemp("training"))
    yield srv
    srv.stop()


def info(server) -> dict:
    return server_info(server)


def wait_for_training(server, timeout: float = 900) -> tuple[dict, list[dict]]:
    return helpers.wait_for_training(server, MODEL, timeout)


def start_training(server, params: dict) -> dict:
    return helpers.start_training(server, MODEL, params)


def click(server, slice_index: int, point_rc, label: str | None, image: str = IMAGE,
          prompt_encoder: str = "auto") -> np.ndarray:
    """One foreground click as Slicer sends it (IJK voxel), on an axial slice; the returned slice mask."""
    row, col = point_rc
    params = {"foreground": [[int(col), int(row), slice_index]], "background": [], "result_extension": ".nii.gz",
              "prompt_encoder": prompt_encoder}
    if label:
        params["label"] = label
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "image"},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 200, response.text
    path = os.path.join(server.studies, "..", f"click_{slice_index}.nii.gz")
    with open(path, "wb") as f:
        f.write(response.content)
    return np.asarray(nib.load(path).dataobj)[:, :, slice_index].T > 0  # (i, j) -> (rows=j, cols=i)


def putamen(server) -> np.ndarray:
    path = os.path.join(server.studies, "labels", "final", f"{IMAGE}.nii.gz")
    return np.asarray(nib.load(path).dataobj).round() == PUTAMEN_L


def test_a_request_that_cannot_run_fails_clearly_and_serving_goes_on(server):
    start_training(server, {"label": "Not_A_Region"})
    task, _ = wait_for_training(server)
    assert task["status"] == "ERROR"
    assert any("give its voxel value as 'label_value'" in line for line in task["details"]), task["details"]
    stats = info(server)["train_stats"][MODEL]
    assert stats["status"] == "failed" and "Not_A_Region" in stats["error"]
    mask = click(server, 74, Target("t", putamen(server)[:, :, 74].T).interior_point, None)
    assert mask.any()


def test_two_labelled_slices_teach_the_model_single_clicks(server):
    task = start_training(server, {"label": "Putamen_L", "label_value": PUTAMEN_L, "slices": 2})
    assert task["status"] in ("SUBMITTED", "RUNNING")
    task, seen = wait_for_training(server)
    assert task["status"] == "DONE", task["details"]
    steps = [s["step"] for s in seen if s.get("status") == "training"]
    assert steps and max(steps) <= 60, seen  # progress was visible step by step while it ran

    learned = info(server)["models"][MODEL]["learned_prompts"]["Putamen_L"]
    assert learned["num_slices"] == 2 and learned["label_value"] == PUTAMEN_L
    assert learned["validation"]["held_out_slices"] >= 3 and learned["validation"]["method"] == "held_out"
    assert 0 <= learned["validation"]["learned"]["one_click_dice"] <= 1
    assert info(server)["train_stats"][MODEL]["status"] == "done"

    # One click at the centre of the putamen on labelled slices it did not learn from: the learned prompt encoder
    # against the vanilla click (box search on the box-trained model); the click model, what a label nobody taught
    # gets on MR, for the record.
    volume = putamen(server)
    trained = {s["index"] for s in learned["slices"]}
    held_out = [k for k in range(volume.shape[2]) if volume[:, :, k].sum() >= 30 and k not in trained][::3]
    vanilla, taught, click_model = [], [], []
    for k in held_out:
        mask = volume[:, :, k].T
        point = Target("putamen", mask).interior_point
        vanilla.append(dice(click(server, k, point, None, prompt_encoder="vanilla"), mask))
        taught.append(dice(click(server, k, point, "Putamen_L", prompt_encoder="learned"), mask))
        click_model.append(dice(click(server, k, point, None), mask))
    print(f"one click on {len(held_out)} held-out slices: vanilla {np.mean(vanilla):.3f} -> learned {np.mean(taught):.3f}"
          f" (click model {np.mean(click_model):.3f})")
    assert np.mean(taught) >= 0.50
    assert np.mean(taught) >= np.mean(vanilla) + 0.05


def test_a_stopped_run_keeps_what_was_learned(server):
    before = info(server)["models"][MODEL]["learned_prompts"]
    start_training(server, {"label": "Thalamus_L", "label_value": 77, "slices": 2, "iterations": 5000})
    deadline = time.time() + 300
    while info(server)["train_stats"].get(MODEL, {}).get("status") != "training":
        assert time.time() < deadline, server.tail()
        time.sleep(1)
    stopped = requests.delete(f"{server.url}/train/", timeout=60).json()
    assert stopped["status"] == "STOPPED"
    assert info(server)["train_stats"][MODEL]["status"] == "stopped"
    after = info(server)["models"][MODEL]["learned_prompts"]
    assert "Thalamus_L" not in after and after["Putamen_L"] == before["Putamen_L"]
    volume = putamen(server)
    mask = click(server, 74, Target("t", volume[:, :, 74].T).interior_point, "Putamen_L")
    assert dice(mask, volume[:, :, 74].T) > 0.3


def test_a_killed_training_process_leaves_serving_and_the_learned_state_intact(server):
    import psutil

    before = info(server)["models"][MODEL]["learned_prompts"]
    start_training(server, {"label": "Thalamus_R", "label_value": 78, "slices": 2, "iterations": 5000})
    deadline = time.time() + 300
    while info(server)["train_stats"].get(MODEL, {}).get("status") != "training":
        assert time.time() < deadline, server.tail()
        time.sleep(1)
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert children, "training runs in a subprocess"
    for child in children:
        child.kill()  # SIGKILL: no cleanup runs in the trainer
    deadline = time.time() + 120
    while requests.get(f"{server.url}/train/", timeout=60).json().get("status") in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, server.tail()
        time.sleep(1)
    assert server.alive()
    after = info(server)["models"][MODEL]["learned_prompts"]
    assert "Thalamus_R" not in after and after["Putamen_L"] == before["Putamen_L"]
    volume = putamen(server)
    mask = click(server, 74, Target("t", volume[:, :, 74].T).interior_point, "Putamen_L")
    assert dice(mask, volume[:, :, 74].T) > 0.3


def test_samauto_segments_the_volume_with_no_prompts(server):
    """The same training also learned SAMauto's SAP-Net: the auto task returns the whole structure, no clicks,
    over a slab of 60 axial slices around it (more than twice its extent: slices without it must stay empty)."""
    volume = putamen(server)
    learned = info(server)["models"][MODEL]["learned_prompts"]["Putamen_L"]
    assert learned["auto"]["axis"] == 2
    extent = np.nonzero(volume.any((0, 1)))[0]
    start, stop = max(0, int(extent.mean()) - 30), min(volume.shape[2], int(extent.mean()) + 30)
    response = requests.post(f"{server.url}/infer/{MODEL}_auto", params={"image": IMAGE, "output": "image"},
                             data={"params": json.dumps({"label": "Putamen_L", "label_value": 5,
                                                         "slices": [start, stop], "result_extension": ".nii.gz"})},
                             timeout=900)
    assert response.status_code == 200, response.text
    path = os.path.join(server.studies, "..", "auto.nii.gz")
    with open(path, "wb") as f:
        f.write(response.content)
    result = np.asarray(nib.load(path).dataobj)
    assert result.shape == volume.shape and set(np.unique(result)) <= {0, 5}
    # Trivial baseline: each slice of the slab gets the nearest annotated slice's mask.
    annotated = sorted(s["index"] for s in learned["slices"])
    copied = np.zeros_like(volume)
    for k in range(start, stop):
        copied[:, :, k] = volume[:, :, min(annotated, key=lambda a: abs(a - k))]
    for index in annotated:  # the training slices come back exactly as they were labelled
        assert np.array_equal(result[:, :, index] > 0, volume[:, :, index]), index
    auto_dice, copy_dice = dice(result > 0, volume), dice(copied, volume)
    print(f"SAMauto putamen volume Dice {auto_dice:.3f}; nearest-annotated-slice copy {copy_dice:.3f}")
    # Measured 0.790 (0.629 before the training slices anchored the choice of components) against 0.457.
    assert auto_dice >= max(copy_dice + 0.05, 0.70)


def test_samauto_says_what_is_missing(server):
    url = f"{server.url}/infer/{MODEL}_auto"
    learned = sorted(info(server)["models"][f"{MODEL}_auto"]["learned_labels"])
    # No label (OHIF's Auto-Segmentation sends none): the one learned label, or a 400 that names them.
    missing = requests.post(url, params={"image": IMAGE}, data={"params": json.dumps({"slices": [60, 62]})},
                            timeout=300)
    if len(learned) == 1:
        assert missing.status_code == 200, missing.text
    else:
        assert missing.status_code == 400 and "label" in missing.text and all(n in missing.text for n in learned)
    unknown = requests.post(url, params={"image": IMAGE}, data={"params": json.dumps({"label": "Caudate_R"})}, timeout=60)
    assert unknown.status_code == 404 and "train it first" in unknown.text


def test_two_slices_labelled_in_a_client_are_enough(server, tmp_path):
    """The whole flow on a new study: two slices labelled and saved as Slicer/OHIF save them (PUT, with the
    segment's name in label_info), training by that name alone, then clicks on the slices nobody labelled."""
    source = os.path.join(server.studies, f"{IMAGE}.nii.gz")
    with open(source, "rb") as f:
        response = requests.put(f"{server.url}/datastore/image", params={"image": "new_study"},
                                files={"file": ("new_study.nii.gz", f)}, timeout=60)
    assert response.status_code == 200, response.text
    truth = putamen(server)
    labelled = select_training_slices(truth, 2, 2, np.random.default_rng(7))  # where a person would draw
    partial = np.zeros(truth.shape, np.uint8)
    for k in labelled:
        partial[:, :, k] = truth[:, :, k] * 200
    path = str(tmp_path / "two_slices.nii.gz")
    nib.save(nib.Nifti1Image(partial, nib.load(source).affine), path)
    with open(path, "rb") as f:
        response = requests.put(f"{server.url}/datastore/label", params={"image": "new_study", "tag": "final"},
                                data={"params": json.dumps({"label_info": [{"name": "Lentiform_L", "idx": 200}]})},
                                files={"label": ("new_study.nii.gz", f)}, timeout=60)
    assert response.status_code == 200, response.text

    start_training(server, {"label": "Lentiform_L", "slices": 2, "auto": False})
    task, _ = wait_for_training(server)
    assert task["status"] == "DONE", task["details"]
    learned = info(server)["models"][MODEL]["learned_prompts"]["Lentiform_L"]
    assert learned["label_value"] == 200 and sorted(s["index"] for s in learned["slices"]) == sorted(labelled)
    # Nothing left to hold out: validated leave-one-slice-out, each slice scored by an encoder learned on the other.
    validation = learned["validation"]
    assert validation["method"] == "leave_one_slice_out" and validation["held_out_slices"] == 0
    assert sorted(fold["slice"]["index"] for fold in validation["folds"]) == sorted(labelled)
    assert 0 <= validation["learned"]["one_click_dice"] <= 1 and 0 <= validation["vanilla"]["one_click_dice"] <= 1
    assert set(learned["auto_choice"]) == {"click", "box", "box_then_clicks"}
    assert learned["auto"] is None

    # What the learned encoder gives (`auto` answers clicks with it only where the folds scored it better: with
    # 2 slices each fold learned from 1, which can understate it).
    held_out = [k for k in range(truth.shape[2]) if truth[:, :, k].sum() >= 30 and k not in labelled][::4]
    scores = [dice(click(server, k, Target("t", truth[:, :, k].T).interior_point, "Lentiform_L", "new_study",
                         "learned"), truth[:, :, k].T) for k in held_out]
    print(f"one click after learning from 2 client-labelled slices {labelled}: {np.mean(scores):.3f} on {len(held_out)} slices")
    assert np.mean(scores) >= 0.45
