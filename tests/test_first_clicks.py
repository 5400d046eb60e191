"""First clicks and corrections through the server, as Slicer sends them (issue 18).

A click on a small target must return a mask of that target's order of size (not the organ around it), and an
annotator's corrective clicks, put where the CVPR 2025 interactive challenge puts them, must not make the mask
worse. Targets are held out from the click model's training (scripts/train_click_model.py): real DSB nuclei (a
modality it never saw), AAL's putamen and hippocampus (structures it never saw) and SYNTHETIC fundus lesions.
Thresholds sit below what was measured here; each says what.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests

from helpers import decode_multipart, dice, read_label, start_on_sample_data
from lib.core.evaluation import Target, box_prompt, click_prompt, component_targets, corrective_session

MODEL = "litemedsam"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_on_sample_data(tmp_path_factory.mktemp("first_clicks"))
    yield srv
    srv.stop()


def truth_slice(server, image: str, k: int | None) -> np.ndarray:
    """The ground truth on slice k (rows, cols) as the server slices it, or the 2D image's label."""
    name = f"{image}.nii.gz" if k is not None else f"{image}.png"
    label = read_label(os.path.join(server.studies, "labels", "final", name))
    return (label[:, :, k] if k is not None else label).T.round().astype(int)


def served_mask(server, image: str, k: int | None, prompt, tmp_path, extra: dict | None = None) -> tuple[np.ndarray, dict]:
    """The server's answer to a prompt on one slice, as (rows, cols) mask and its JSON."""
    to_ijk = (lambda r, c: [int(round(c)), int(round(r)), k]) if k is not None else (lambda r, c: [int(round(c)), int(round(r))])
    params = {"foreground": [to_ijk(r, c) for r, c in prompt.foreground],
              "background": [to_ijk(r, c) for r, c in prompt.background], "result_extension": ".nii.gz"
              if k is not None else ".png", **(extra or {})}
    if prompt.box is not None:
        r0, c0, r1, c1 = (int(round(v)) for v in prompt.box)
        params["roi"] = [c0, c1, r0, r1] + ([k, k] if k is not None else [])
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "all"},
                             data={"params": json.dumps(params)}, timeout=600)
    assert response.status_code == 200, response.text
    result, label = decode_multipart(response, tmp_path)
    mask = (label[:, :, k] if k is not None else label).T > 0
    return mask, result


HELD_OUT = ("Hippocampus_L", "Hippocampus_R", "Putamen_L", "Vermis_4_5", "Cerebelum_6_L", "Insula_R")


def mr_targets(server):
    """(image, slice, target): held-out AAL structures (the click model never saw them), the largest
    cross-section on the axial slice in the middle of each one's extent."""
    with open(os.path.join(server.studies, "labels", "colin27_aal_names.json")) as f:
        values = {name: int(v) for v, name in json.load(f).items()}
    volume = read_label(os.path.join(server.studies, "labels", "final", "colin27_t1.nii.gz")).round().astype(int)
    out = []
    for name in HELD_OUT:
        present = np.nonzero((volume == values[name]).any(axis=(0, 1)))[0]
        k = int(present[len(present) // 2])
        out.append(("colin27_t1", k, component_targets(volume[:, :, k].T, [values[name]], min_area=30)[0]))
    return out


def small_targets(server):
    """(image, slice, target): held-out small targets: AAL structures in cross-section, and DSB nuclei."""
    nuclei = component_targets((truth_slice(server, "nuclei", None) > 0).astype(int), [1], min_area=40)
    return mr_targets(server) + [("nuclei", None, nuclei[i]) for i in np.linspace(0, len(nuclei) - 1, 3).round().astype(int)]


def test_a_first_click_on_a_small_mr_target_returns_that_target(server, tmp_path):
    """The first click at a small target's centre on an MR volume: the click model answers, with a mask of the
    target's order of size, not the organ around it (the box search returned over 5x the target's area on 45% of
    such targets in benchmarks/bench_interactive.py, the click model on none)."""
    ratios, scores = [], []
    for image, k, target in mr_targets(server):
        mask, result = served_mask(server, image, k, click_prompt(target, 2, k), tmp_path)
        assert result["prompt_encoder"] == "click_model", result
        ratios.append(mask.sum() / target.mask.sum())
        scores.append(dice(mask, target.mask))
    print("first click on held-out AAL structures: area ratio", np.round(ratios, 2), "Dice", np.round(scores, 3))
    assert max(ratios) <= 5.0, ratios
    assert np.mean(scores) >= 0.45, scores  # benchmark: 0.573 on 33 such targets


def test_the_click_model_does_not_answer_kinds_of_image_it_lost_on(server, tmp_path):
    """A 2D microscopy image (normalised like MR, but no MR scan) keeps the box search, where the click model
    scored 0.353 against 0.683 on nuclei."""
    image, k, target = small_targets(server)[-3]  # the largest of the three nuclei
    mask, result = served_mask(server, image, k, click_prompt(target, None, None), tmp_path)
    assert result["prompt_encoder"] == "vanilla", result
    assert dice(mask, target.mask) >= 0.5
    info = requests.get(f"{server.url}/info/", timeout=30).json()["models"][MODEL]["click_model"]
    assert info["available"] and info["image_kinds"] == ["MR/3D"], info


def test_corrective_clicks_do_not_make_the_mask_worse(server, tmp_path):
    """A click, or a box, then 5 corrective clicks where the CVPR 2025 protocol puts them: on average over the
    targets no step lowers the Dice by more than 0.02, and the last is at least the first."""
    curves = {"click": [], "box": []}
    for image, k, target in small_targets(server)[::2]:
        axis = 2 if k is not None else None
        for kind, first in (("click", click_prompt(target, axis, k)), ("box", box_prompt(target, axis, k))):
            predict = lambda prompt: served_mask(server, image, k, prompt, tmp_path)[0]
            curves[kind].append(corrective_session(predict, target, first, max_clicks=5))
    for kind, sessions in curves.items():
        mean = np.mean(sessions, axis=0)
        print(kind, "then 5 corrective clicks, mean Dice per step", np.round(mean, 3))
        assert np.diff(mean).min() >= -0.02, (kind, mean)
        assert mean[-1] >= mean[0], (kind, mean)


def test_vanilla_keeps_the_box_search_and_its_object_memory(server, tmp_path):
    """`prompt_encoder: vanilla` still answers clicks with the box search, and a second click on the object
    refines the box it chose."""
    image, k, target = mr_targets(server)[2]
    first = click_prompt(target, 2, k)
    _, result = served_mask(server, image, k, first, tmp_path, {"prompt_encoder": "vanilla"})
    assert result["prompt_encoder"] == "vanilla" and not result["refined_object"]
    second = Target("more", target.mask)
    prompt = click_prompt(second, 2, k)
    prompt = type(prompt)(axis=2, index=k, foreground=np.concatenate([first.foreground, prompt.foreground + 1]),
                          background=prompt.background, box=None)
    _, result = served_mask(server, image, k, prompt, tmp_path, {"prompt_encoder": "vanilla"})
    assert result["refined_object"]
