"""Choosing with evidence: a label's learned prompt encoder (SAMassist) or adapter (MSA) is validated against what
the app answers without it, on held-out slices or, with too few labelled slices to hold any out, leave-one-slice-out;
`auto` then answers each kind of prompt (clicks, a box, a box with clicks) with whichever validated better.

The training runs here are real but short (Colin27's left thalamus labelled on two slices, few steps): they check
what is recorded, not how good it is."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import SAMPLE_DATA, read_label
from lib.core.backbone import Backbone
from lib.core.evaluation import Target
from lib.core.predictor import PredictorSettings
from lib.core.prompts import SlicePrompt
from lib.core.stores import LabelStore
from lib.core.training import LEAVE_ONE_SLICE_OUT, auto_choice, combined_figures
from lib.models.sam import build_litemedsam
from lib.models.sam.adapters import AdapterSettings, adapter_state, add_adapters

IMAGE = "colin27_t1"
THALAMUS_L = 77  # AAL value
WHOLE_SLICES = PredictorSettings(zoom=False)  # the app's `zoom: false`: one encoder run per validation slice


@pytest.fixture(scope="module")
def litemedsam():
    return build_litemedsam().eval()


@pytest.fixture(scope="module")
def two_slice_datastore(tmp_path_factory):
    """A datastore whose only final label is the left thalamus on two of its axial slices, a third and two thirds
    through it (far enough apart that neither is the other's neighbour)."""
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path_factory.mktemp("two_slices")
    shutil.copy(os.path.join(SAMPLE_DATA, f"{IMAGE}.nii.gz"), studies / f"{IMAGE}.nii.gz")
    atlas = nib.load(os.path.join(SAMPLE_DATA, "labels", "final", f"{IMAGE}.nii.gz"))
    thalamus = np.asarray(atlas.dataobj).round() == THALAMUS_L
    extent = [k for k in range(thalamus.shape[2]) if thalamus[:, :, k].sum() >= 30]
    labelled = [extent[len(extent) // 3], extent[2 * len(extent) // 3]]
    partial = np.zeros(thalamus.shape, np.uint8)
    for k in labelled:
        partial[:, :, k] = thalamus[:, :, k] * THALAMUS_L
    os.makedirs(studies / "labels" / "final")
    nib.save(nib.Nifti1Image(partial, atlas.affine), str(studies / "labels" / "final" / f"{IMAGE}.nii.gz"))
    return LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False), labelled


def assert_leave_one_slice_out(validation: dict, left_out: list[int], names: tuple[str, str]) -> None:
    """One fold per left-out slice, each scored by both; the record's figures are the folds' mean."""
    assert validation["method"] == LEAVE_ONE_SLICE_OUT and validation["held_out_slices"] == 0
    assert validation["slices"] == len(left_out) and "too few labelled slices" in validation["note"]
    folds = validation["folds"]
    assert sorted(fold["slice"]["index"] for fold in folds) == sorted(left_out)
    for fold in folds:
        for name in names:
            figures = fold[name]
            assert figures["slices"] == 1 and 0 <= figures["one_click_dice"] <= 1
            assert len(figures["box_then_clicks_dice"]) == 6 and figures["box_dice"] == figures["box_then_clicks_dice"][0]
    for name in names:
        assert validation[name] == combined_figures([fold[name] for fold in folds])
        assert validation[name]["one_click_dice"] == pytest.approx(np.mean([f[name]["one_click_dice"] for f in folds]),
                                                                   abs=1e-4)


# -- leave-one-slice-out, through real (short) training runs -----------------------------------------------------
def test_samassist_with_two_labelled_slices_validates_leave_one_slice_out(two_slice_datastore, litemedsam, tmp_path):
    from lib.sammed.samassist import samassist_auto_choice
    from lib.sammed.train_task import SAMassistTrainTask

    datastore, labelled = two_slice_datastore
    store = LabelStore(str(tmp_path / "prompts"))
    # A click model for the served LiteMedSAM (here its own prompt encoder's weights): the baseline for clicks.
    click_model = str(tmp_path / "click_model.pt")
    torch.save({"prompt_encoder": litemedsam.prompt_encoder.state_dict(), "image_kinds": ["MR/3D"]}, click_model)
    settings = {"device": "cpu", "modality": "", "ct_window": None, "zoom": WHOLE_SLICES.zoom,
                "encoder_runtime": "eager", "litemedsam_checkpoint": "", "click_model_weights": click_model}
    task = SAMassistTrainTask.from_settings(str(tmp_path / "train"), lambda device: litemedsam, store, settings)
    task({"model": "litemedsam", "label": "Thalamus_L", "label_value": THALAMUS_L, "slices": 2, "iterations": 1,
          "auto": False}, datastore)

    meta = store.meta("Thalamus_L")
    assert sorted(s["index"] for s in meta["slices"]) == sorted(labelled)
    validation = meta["validation"]
    print("SAMassist leave-one-slice-out:", validation["learned"], validation["vanilla"])
    assert_leave_one_slice_out(validation, labelled, ("learned", "vanilla"))
    assert validation["baseline"] == {"click": "click_model", "box": "vanilla", "box_then_clicks": "vanilla"}
    assert meta["auto_choice"] == samassist_auto_choice(validation)


def test_msa_with_two_labelled_slices_validates_leave_one_slice_out(two_slice_datastore, litemedsam, tmp_path):
    from lib.msa.learner import msa_auto_choice
    from lib.msa.train_task import FOLD_EPOCHS, MSATrainTask

    datastore, labelled = two_slice_datastore
    store = LabelStore(str(tmp_path / "adapters"))
    task = MSATrainTask(str(tmp_path / "train"), lambda device: litemedsam, store, device="cpu",
                        predictor_settings=WHOLE_SLICES)
    # Decoder adapters only, one epoch: the shortest run that trains something.
    task({"label": "Thalamus_L", "label_value": THALAMUS_L, "encoder_blocks": 0, "epochs": 1}, datastore)

    meta = store.meta("Thalamus_L")
    assert meta["num_slices"] == 2 and meta["held_out"] == []
    validation = meta["validation"]
    print("MSA leave-one-slice-out:", validation["adapted"], validation["frozen"])
    assert_leave_one_slice_out(validation, labelled, ("adapted", "frozen"))
    assert validation["fold_epochs"] == min(1, FOLD_EPOCHS) and validation["gap"] == 1
    assert all(fold["trained_on"] == 1 for fold in validation["folds"])
    assert meta["auto_choice"] == msa_auto_choice(validation)


def test_only_litemedsam_with_its_default_weights_has_a_click_model_baseline():
    from lib.sammed.click_model import WEIGHTS
    from lib.sammed.click_model import click_model_path_for

    assert click_model_path_for("litemedsam", {"litemedsam_checkpoint": "", "click_model_weights": ""}) == WEIGHTS
    assert click_model_path_for("litemedsam", {"click_model_weights": "/elsewhere.pt"}) == "/elsewhere.pt"
    assert click_model_path_for("litemedsam", {"click_model_weights": "none"}) is None
    assert click_model_path_for("litemedsam", {"litemedsam_checkpoint": "/my/medsam.pth"}) is None
    assert click_model_path_for("sam_vit_b", {}) is None


# -- auto follows the stored validation ------------------------------------------------------------------------
def figures(click: float, box: float, box_then_clicks: float) -> dict:
    return {"slices": 2, "one_click_dice": click, "box_dice": box,
            "box_then_clicks_dice": [box, (box + box_then_clicks) / 2, box_then_clicks]}


def test_auto_choice_takes_the_better_figure_per_prompt_kind_and_the_default_without_one():
    default = {"click": "learned", "box": "vanilla", "box_then_clicks": "vanilla"}
    validation = {"method": LEAVE_ONE_SLICE_OUT, "learned": figures(0.60, 0.80, 0.70),
                  "vanilla": figures(0.75, 0.70, 0.70)}
    assert auto_choice(validation, "learned", "vanilla", default) == {
        "click": "vanilla", "box": "learned", "box_then_clicks": "vanilla"}  # a tie keeps the default
    assert auto_choice({"held_out_slices": 0, "note": "..."}, "learned", "vanilla", default) == default
    assert auto_choice(None, "learned", "vanilla", default) == default


def click_and_box_prompts(mask: np.ndarray, k: int) -> dict[str, SlicePrompt]:
    target = Target("t", mask)
    empty = np.zeros((0, 2), np.float32)
    click = np.asarray([target.interior_point], np.float32)
    return {"click": SlicePrompt(2, k, click, empty, None), "box": SlicePrompt(2, k, empty, empty, target.box),
            "box_then_clicks": SlicePrompt(2, k, click, empty, target.box)}


def test_samassist_auto_answers_with_whichever_encoder_validated_better(litemedsam, tmp_path):
    from lib.sammed.learned_prompts import LearnedPromptEncoders

    store = LabelStore(str(tmp_path / "prompts"))
    learned_state = {k: v + 0.01 for k, v in litemedsam.prompt_encoder.state_dict().items()}
    click_model_path = str(tmp_path / "click_model.pt")
    torch.save({"prompt_encoder": litemedsam.prompt_encoder.state_dict()}, click_model_path)
    encoders = LearnedPromptEncoders(store, click_model_path)
    click_model = encoders.click_model(litemedsam.prompt_encoder)
    assert click_model is not None
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    prompts = click_and_box_prompts(mask, 3)
    answer = lambda label: {kind: encoders.encoder_for(litemedsam, label, prompt, "auto")
                            for kind, prompt in prompts.items()}

    # The baseline (here the click model) validated better on clicks, the learned encoder on boxes.
    store.save("Learned_boxes", learned_state, {"validation": {"learned": figures(0.55, 0.85, 0.90),
                                                               "vanilla": figures(0.70, 0.60, 0.80)}})
    chosen = answer("Learned_boxes")
    assert chosen["click"] is click_model
    assert chosen["box"] is not None and chosen["box"] is not click_model
    assert chosen["box"].state_dict()["point_embeddings.0.weight"].allclose(learned_state["point_embeddings.0.weight"])
    assert chosen["box_then_clicks"] is chosen["box"]

    # The other way round.
    store.save("Learned_clicks", learned_state, {"validation": {"learned": figures(0.80, 0.50, 0.60),
                                                                "vanilla": figures(0.40, 0.70, 0.75)}})
    chosen = answer("Learned_clicks")
    assert chosen["click"] is not None and chosen["click"] is not click_model
    assert chosen["box"] is None and chosen["box_then_clicks"] is None

    # No figures (a record with nothing held out and no folds): as before, learned for clicks, vanilla for boxes.
    store.save("Unvalidated", learned_state, {"validation": {"held_out_slices": 0, "note": "label more slices"}})
    chosen = answer("Unvalidated")
    assert chosen["click"] is not click_model and chosen["box"] is None and chosen["box_then_clicks"] is None
    # A label nobody taught: the click model for clicks, the vanilla encoder for boxes.
    assert answer("Untaught") == {"click": click_model, "box": None, "box_then_clicks": None}


def test_msa_auto_answers_with_whichever_model_validated_better(litemedsam, tmp_path):
    from lib.msa.infer import AdapterInfer
    from lib.sam.interactive import SamInteractiveInfer

    backbone = Backbone(lambda device: litemedsam, device="cpu")
    store = LabelStore(str(tmp_path / "adapters"))
    settings = AdapterSettings(encoder_blocks=0)
    state = adapter_state(add_adapters(litemedsam, settings))
    validation = {"method": LEAVE_ONE_SLICE_OUT, "adapted": figures(0.60, 0.85, 0.70),
                  "frozen": figures(0.80, 0.60, 0.75)}
    store.save("Thalamus_L", state, {"label_value": THALAMUS_L, "adapters": asdict(settings),
                                     "validation": validation})
    task = AdapterInfer(backbone, SamInteractiveInfer(backbone), store)
    assert task.info()["adapters"]["Thalamus_L"]["auto_choice"] == {
        "click": "frozen", "box": "adapted", "box_then_clicks": "frozen"}

    atlas = read_label(os.path.join(SAMPLE_DATA, "labels", "final", f"{IMAGE}.nii.gz"))
    k = 80  # the middle of its axial extent (70-91)
    j, i = (int(v) for v in Target("t", (atlas[:, :, k] == THALAMUS_L).T).interior_point)
    request = {"image": os.path.join(SAMPLE_DATA, f"{IMAGE}.nii.gz"), "label": "Thalamus_L",
               "label_value": THALAMUS_L}
    click = {"foreground": [[i, j, k]]}
    box = {"roi": [i - 8, i + 8, j - 8, j + 8, k, k]}
    answered = {}
    for kind, prompt in (("click", click), ("box", box), ("box_then_clicks", {**box, **click})):
        path, result = task({**request, **prompt})
        os.remove(path)
        answered[kind] = result["adapter"]
    assert answered == {"click": None, "box": "Thalamus_L", "box_then_clicks": None}
