"""Active learning (issue 16): what Next Sample hands out, before and after a label has a model, and the scores the
scoring method keeps. The datastore is the sample data with Colin27's putamen labelled on two slices only (what a
team has after its first minutes), Colin27 cut to a 50-slice slab around it and no MNI152 (short scoring runs).
"""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from helpers import SAMPLE_DATA, server_info, start_on_sample_data, start_training, wait_for_training
from lib.core.active_learning import widest_spread_slice
from lib.sammed.uncertainty import disagreeing_pixels, image_uncertainty, slice_disagreement

MODEL = "litemedsam"
PUTAMEN_L = 73  # AAL value
IMAGE_STRATEGY, SLICE_STRATEGY, SCORING = (f"{MODEL}_uncertain_image", f"{MODEL}_uncertain_slice",
                                          f"{MODEL}_uncertainty")


SLAB = (50, 100)  # Colin27's axial slices kept in this datastore (the putamen is on 61-87): a shorter volume to score


def full_putamen() -> np.ndarray:
    label = np.asarray(nib.load(os.path.join(SAMPLE_DATA, "labels", "final", "colin27_t1.nii.gz")).dataobj)
    return label[:, :, SLAB[0]:SLAB[1]].round() == PUTAMEN_L


def slab(img) -> tuple[np.ndarray, np.ndarray]:
    """The slab's voxels and its affine (the same physical place)."""
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, SLAB[0]]) + img.affine[:3, 3]
    return np.asarray(img.dataobj)[:, :, SLAB[0]:SLAB[1]], affine


def putamen_slices() -> list[int]:
    return np.nonzero(full_putamen().any(axis=(0, 1)))[0].tolist()


def two_labelled_slices() -> list[int]:
    extent = putamen_slices()
    return [extent[len(extent) // 3], extent[2 * len(extent) // 3]]


def partial_labels(studies: str) -> None:
    os.unlink(os.path.join(studies, "mni152_t1.nii.gz"))
    image_path = os.path.join(studies, "colin27_t1.nii.gz")
    voxels, affine = slab(nib.load(image_path))
    nib.save(nib.Nifti1Image(voxels, affine), image_path)
    label = np.zeros(voxels.shape, np.uint8)
    for k in two_labelled_slices():
        label[:, :, k] = full_putamen()[:, :, k] * PUTAMEN_L
    nib.save(nib.Nifti1Image(label, affine), os.path.join(studies, "labels", "final", "colin27_t1.nii.gz"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_on_sample_data(tmp_path_factory.mktemp("active_learning"), prepare=partial_labels,
                               conf={"retrain_after_new_labels": 2})
    yield srv
    srv.stop()


def next_sample(server, strategy: str, params: dict) -> requests.Response:
    return requests.post(f"{server.url}/activelearning/{strategy}", json=params, timeout=900)


# ---- rules and scores, no server -------------------------------------------------------------------------------

def test_widest_spread_slice():
    assert widest_spread_slice([], list(range(11))) == 5
    assert widest_spread_slice([2], list(range(11))) == 10
    assert widest_spread_slice([3, 7], list(range(3, 12))) == 11
    assert widest_spread_slice([0, 10], list(range(11))) == 5  # between them, not on them


def test_disagreement_between_coarse_and_refined_masks():
    coarse = np.zeros((4, 8, 8), bool)
    refined = np.zeros((4, 8, 8), bool)
    coarse[0, :4], refined[0, :4] = True, True  # agree
    coarse[1, :4], refined[1, 4:] = True, True  # disagree completely
    coarse[2, :2] = True  # refined empty: a tip SAM dropped, where the model does not claim the structure
    coarse[3, :4], refined[3, :2] = True, True  # the annotated slice: left out
    scores = slice_disagreement(coarse, refined, annotated=[3])
    assert scores == {0: 0.0, 1: 1.0}
    assert image_uncertainty(scores) == pytest.approx(0.5, abs=1e-4)
    assert image_uncertainty({}) == 1.0  # the model finds the structure nowhere
    # Slices are ranked by the disputed pixels: a big slice half wrong outranks a tiny one all wrong.
    assert disagreeing_pixels(coarse, refined, annotated=[3]) == {0: 0, 1: 64}
    coarse[2, :2], refined[2, :1], refined[2, 4:] = False, True, True  # 8 of 40 refined pixels disputed
    coarse[2, 4:] = True
    coarse[1], refined[1] = False, False
    coarse[1, 0, 0], refined[1, 0, 1] = True, True  # 2 disputed pixels: 1 − Dice = 1
    assert slice_disagreement(coarse, refined)[1] > slice_disagreement(coarse, refined)[2]
    assert disagreeing_pixels(coarse, refined)[2] > disagreeing_pixels(coarse, refined)[1]


# Measured (2026-12-03, this CPU, OpenVINO bf16): SAMauto volume Dice on the slab after 2 added slices, served
# strategy 0.718; random 0.537, 0.628, 0.728 (mean 0.631); evenly spaced 0.576. The margin asserted is 0.05, about
# half the measured 0.087: the runs are seeded, but a CPU with other bf16 kernels moves each curve by a few hundredths.
# Putamen_L was measured first and does not separate the policies: from 2 slices it is already at 0.79, and 2 more
# gave 0.819 served against 0.804-0.859 random (mean 0.824); the README's benchmark reports such cases too.
BEATS_RANDOM_SLAB, HIPPOCAMPUS_L, BEATS_RANDOM_MARGIN = (40, 90), 37, 0.05


def test_the_slice_strategy_beats_random_slices(capsys):
    """The simulated session of benchmarks/bench_active_learning.py on a small fixed case: a 50-slice slab of
    Colin27 holding the left hippocampus (axial 44-83 of 181: long and thin, where 2 slices leave room to learn),
    taught from the same 2 slices, then 2 slices added, chosen by the served slice strategy or at random within the
    structure's true extent (3 seeds); SAP-Net retrained after each, as the train task does."""
    import torch

    from benchmarks.bench_active_learning import Study, simulate
    from helpers import RUNTIME_CACHE
    from lib.core.backbone import SamEncoding
    from lib.core.runtime import FrozenForward, resolve_runtime
    from lib.models.sam import build_litemedsam

    model = build_litemedsam().eval()
    encode = FrozenForward(SamEncoding(model), resolve_runtime("auto", torch.device("cpu")), RUNTIME_CACHE)
    labels = np.asarray(nib.load(os.path.join(SAMPLE_DATA, "labels", "final", "colin27_t1.nii.gz")).dataobj)
    study = Study(os.path.join(SAMPLE_DATA, "colin27_t1.nii.gz"), labels.round().astype(np.int32), encode,
                  slab=BEATS_RANDOM_SLAB)
    first_steps = {}
    runs = [simulate(model, study, None, HIPPOCAMPUS_L, policy, seed, asked_at_end=4, first_steps=first_steps)
            for policy, seed in [("uncertainty (served)", None), ("random", 0), ("random", 1), ("random", 2)]]
    with capsys.disabled():
        for run in runs:
            print(run["policy"], run["seed"], "asked", run["steps"][-1]["slices"], "Dice",
                  [s["dice"] for s in run["steps"]])
    served = runs[0]["steps"][-1]["dice"]
    random_mean = float(np.mean([run["steps"][-1]["dice"] for run in runs[1:]]))
    assert runs[0]["steps"][0]["dice"] == runs[1]["steps"][0]["dice"]  # the same start
    assert served >= random_mean + BEATS_RANDOM_MARGIN, (served, random_mean)


# ---- through the server ----------------------------------------------------------------------------------------

def test_the_strategies_and_scoring_are_listed(server):
    info = server_info(server)
    assert {"random", "first", IMAGE_STRATEGY, SLICE_STRATEGY} <= set(info["strategies"])
    assert SCORING in info["scoring"]


def test_before_any_model_the_largest_unlabelled_image(server):
    # OHIF's panel sends {}: no label, nothing learned -> any image without a final label.
    response = next_sample(server, IMAGE_STRATEGY, {})
    assert response.status_code == 200, response.text
    assert response.json() == {} or response.json()["id"] not in ("colin27_t1", "head_ct")
    # For the putamen: the images whose labels do not hold it; head CT is the only volume.
    answer = next_sample(server, IMAGE_STRATEGY, {"label": "Putamen_L", "label_value": PUTAMEN_L}).json()
    assert answer["id"] == "head_ct" and "largest" in answer["reason"], answer


def test_before_any_model_the_slice_farthest_from_the_labelled_ones(server):
    answer = next_sample(server, SLICE_STRATEGY, {"label": "Putamen_L", "label_value": PUTAMEN_L,
                                                  "image": "colin27_t1"}).json()
    assert answer["id"] == "colin27_t1" and answer["axis"] == 2
    assert answer["labelled_slices"] == two_labelled_slices()
    assert answer["slice"] not in two_labelled_slices() and "farthest" in answer["reason"], answer


@pytest.mark.parametrize("params, status", [
    ({"label": "Not_A_Structure"}, 404),  # nothing learned or saved under that name
    ({"label_value": PUTAMEN_L, "image": "no_such_image"}, 404),
    ({"label_value": "seventy"}, 400),
    ({"label_value": PUTAMEN_L, "axis": 5}, 400),
    ({"score_budget": -1, "label_value": PUTAMEN_L}, 200),  # no model: the budget is not used
])
def test_bad_requests_are_4xx(server, params, status):
    response = next_sample(server, SLICE_STRATEGY, params)
    assert response.status_code == status, response.text


def test_unknown_strategy_is_404(server):
    assert next_sample(server, "no_such_strategy", {}).status_code == 404


def test_after_training_scores_are_kept_and_the_slice_is_where_the_model_is_unsure(server):
    start_training(server, MODEL, {"label": "Putamen_L", "label_value": PUTAMEN_L, "slices": 2})
    task, _ = wait_for_training(server, MODEL)
    assert task["status"] == "DONE", task

    # The scoring method scores the unlabelled volumes (head CT) in the background and keeps it in the image info.
    response = requests.post(f"{server.url}/scoring/{SCORING}", json={}, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.time() + 900
    while time.time() < deadline:
        status = requests.get(f"{server.url}/scoring/", timeout=30).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(2)
    assert status["status"] == "DONE", status
    learned = server_info(server)["models"][f"{MODEL}_auto"]["learned_labels"]
    assert "Putamen_L" in learned
    answer = next_sample(server, IMAGE_STRATEGY, {"label": "Putamen_L", "score_budget": 0}).json()
    assert answer["id"] == "head_ct" and answer["scored"] == 1 and 0 <= answer["score"] <= 1, answer
    stored = requests.get(f"{server.url}/datastore/image/info", params={"image": "head_ct"}, timeout=30).json()
    assert stored["uncertainty"]["Putamen_L"]["image"] == answer["score"]

    # In Colin27, with two putamen slices labelled: the next slice is not one of them; it is the one, among those
    # where the model draws the putamen, where its two masks disagree most (kept in the image info).
    answer = next_sample(server, SLICE_STRATEGY, {"label": "Putamen_L", "image": "colin27_t1"}).json()
    print("slice strategy after training:", {k: v for k, v in answer.items() if k != "uncertainty"},
          "true extent", putamen_slices()[0], "-", putamen_slices()[-1])
    assert answer["slice"] not in two_labelled_slices() and "disagree" in answer["reason"], answer
    per_slice = answer["uncertainty"]["Putamen_L"]["slices"]  # the image info, as the answer carries it
    assert str(answer["slice"]) in per_slice and answer["score"] == max(per_slice.values())
    assert not set(two_labelled_slices()) & {int(k) for k in per_slice}
    # Measured 2026-12-03: slice 14 of the slab (210 disputed pixels), near the putamen's lower end (11-37), labelled
    # 20 and 29. Whether this rule beats random slices: test_the_slice_strategy_beats_random_slices, and
    # benchmarks/bench_active_learning.py.


def save_putamen_slices(server, slices: list[int], tmp_path) -> None:
    """What a client saves after labelling: Colin27's final label with the putamen on these slices."""
    image = nib.load(os.path.join(server.studies, "colin27_t1.nii.gz"))
    label = np.zeros(image.shape, np.uint8)
    for k in slices:
        label[:, :, k] = full_putamen()[:, :, k] * PUTAMEN_L
    path = str(tmp_path / f"label_{len(slices)}.nii.gz")
    nib.save(nib.Nifti1Image(label, image.affine), path)
    with open(path, "rb") as f:
        response = requests.put(f"{server.url}/datastore/label", params={"image": "colin27_t1", "tag": "final"},
                                files={"label": ("label.nii.gz", f)}, timeout=120)
    assert response.status_code == 200, response.text


def label_status(server) -> dict:
    return server_info(server)["active_learning"]["labels"][MODEL]["Putamen_L"]


def wait_for(condition, timeout: float, what: str, server):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"{what} did not happen in {timeout}s; server log:\n{server.tail()}")


def train_tasks(server) -> list[dict]:
    tasks = requests.get(f"{server.url}/train/", params={"all": True}, timeout=30).json()
    return tasks if isinstance(tasks, list) else [tasks]


def test_new_labels_retrain_the_label_once(server, tmp_path):
    """retrain_after_new_labels is 2: one new labelled slice does nothing, the second starts the label's training
    with its last run's parameters, once; the retrained model learned from the new slices, and /info says so."""
    if "Putamen_L" not in server_info(server)["models"][f"{MODEL}_auto"]["learned_labels"]:
        start_training(server, MODEL, {"label": "Putamen_L", "label_value": PUTAMEN_L, "slices": 2})
        assert wait_for_training(server, MODEL)[0]["status"] == "DONE"
    labelled = two_labelled_slices()
    status = wait_for(lambda: server_info(server)["active_learning"]["labels"].get(MODEL, {}).get("Putamen_L"),
                      120, "the label's status in /info", server)
    assert status["labelled_slices"] == 2 and status["labelled_slices_at_training"] == 2, status
    assert status["retrain_pending"] is False and status["validation"] is not None
    runs_before, trained_at = len(train_tasks(server)), status["trained_at"]

    extent = putamen_slices()
    first, second = extent[2], extent[-3]  # two new slices, one near each end
    save_putamen_slices(server, labelled + [first], tmp_path)
    status = wait_for(lambda: (s := label_status(server))["labelled_slices"] == 3 and s, 120, "the count", server)
    assert status["new_since_training"] == 1 and status["retrain_pending"] is False, status
    assert len(train_tasks(server)) == runs_before

    save_putamen_slices(server, labelled + [first, second], tmp_path)
    status = wait_for(lambda: (s := label_status(server))["labelled_slices"] == 4 and s, 120, "the count", server)
    assert status["retrain_pending"] is True, status
    assert len(train_tasks(server)) == runs_before + 1
    task = wait_for(lambda: (t := train_tasks(server)[-1])["status"] not in ("SUBMITTED", "RUNNING") and t, 900,
                    "the retrain", server)
    assert task["status"] == "DONE", task
    assert task["request"]["label"] == "Putamen_L" and task["request"]["slices"] == 3  # all labelled but one

    status = wait_for(lambda: (s := label_status(server))["trained_at"] != trained_at and s, 120, "publishing",
                      server)
    assert status["labelled_slices_at_training"] == 4 and status["trained_on_slices"] == 3, status
    assert status["new_since_training"] == 0 and status["retrain"]["status"] == "DONE"
    assert status["validation"]["held_out_slices"] == 1
    meta = requests.get(f"{server.url}/info/", timeout=30).json()["models"][f"{MODEL}_auto"]["learned_labels"]
    assert "Putamen_L" in meta

    # Saving the same label again adds no labelled slice: nothing more runs.
    save_putamen_slices(server, labelled + [first, second], tmp_path)
    time.sleep(5)
    assert len(train_tasks(server)) == runs_before + 1
    assert label_status(server)["retrain_pending"] is False
