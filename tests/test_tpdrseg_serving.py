"""TP-DRSeg (Li et al., MICCAI 2024) served as model `tpdrseg` (lib/tpdrseg/infer.py, lib/tpdrseg/train_task.py).

Through one server on a copy of the sample data, whose `fundus_synthetic_lesions.png` carries SYNTHETIC lesions with
a 4-class label: /info lists the classes; without weights /infer is a 503 that says how to train; POST /train/tpdrseg
trains a few steps on the datastore label and publishes weights + metrics; then typed classes, their synonyms, free
text and "all" are answered with masks of the image's shape, and empty text is a 400. The weights come from a
2-step run, so these tests check the plumbing, not the segmentation quality (Dice thresholds: once real training
lands). Plus fast checks of the text parsing, the image <-> model geometry and the weights files (no server).
About 1.5-2 minutes on one CPU thread.

Then the SHIPPED weights (skipped while the files are absent): a server on the default weights answers typed classes
on the held-out sample and on held-out synthetic test images (uploaded to its datastore) above measured Dice
thresholds, and beats a server on the bare-class-name weights by a measured margin. About 2 more minutes.
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import requests
import torch
from requests_toolbelt.multipart.decoder import MultipartDecoder

from helpers import REPO, Server, copy_sample_data, dice, read_label, server_info, start_training, wait_for_training
from lib.core.errors import RequestError
from lib.tpdrseg.checkpoint import finite, read_weights, write_weights
from lib.tpdrseg.model.descriptions import LesionCatalogue
from lib.tpdrseg.preprocessing import model_input, model_target, probabilities_back
from lib.tpdrseg.served_models import DEFAULT_WEIGHTS
from lib.tpdrseg.text_prompts import parse_text

MODEL = "tpdrseg"
IMAGE = "fundus_synthetic_lesions"
CLASSES = ["microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates"]
CATALOGUE = LesionCatalogue.load()

torch.set_num_threads(1)


# -- without a server -----------------------------------------------------------------------------------------
def test_text_maps_names_synonyms_and_typos_to_a_class_else_free_text():
    for typed in ("hard exudates", "EX", "hard exudate", "Hard-Exudates", "lipid deposits", "hard exsudates"):
        prompt = parse_text(typed, CATALOGUE)
        assert prompt.mode == "class" and prompt.cls.key == "hard_exudates", typed
        assert prompt.describe()["embedded"] == CATALOGUE.by_key["hard_exudates"].prompt
    assert parse_text("cotton wool spots", CATALOGUE).cls.key == "soft_exudates"
    assert parse_text("hemorrhage", CATALOGUE).cls.key == "haemorrhages"
    for typed in (None, "all", "All", "all lesions", "*"):
        assert parse_text(typed, CATALOGUE).mode == "all", typed
    free = parse_text("shiny yellow flecks near the fovea", CATALOGUE)
    assert free.mode == "free text" and free.describe()["embedded"] == "shiny yellow flecks near the fovea"
    for typed in ("", "   ", "the", 3):
        with pytest.raises(RequestError) as e:
            parse_text(typed, CATALOGUE)
        assert e.value.status_code == 400 and "Microaneurysms" in e.value.detail and "Soft exudates" in e.value.detail


def test_image_geometry_round_trip():
    """A non-square image: padded to a square, resized to the model size, and probabilities come back on the
    image's own grid (a lesion at the top-left stays there); tiny lesions survive the max-pooled target."""
    rows, cols = 300, 500
    image = torch.zeros(3, rows, cols)
    image[:, 10:40, 20:60] = 1.0
    x, side = model_input(image, 256)
    assert x.shape == (3, 256, 256) and side == 500
    back = probabilities_back(x[:1], side, rows, cols)[0]
    assert back.shape == (rows, cols)
    assert back[15:35, 25:55].mean() > 0.9 and back[100:, 100:].max() < 0.05
    mask = np.zeros((4, rows, cols), bool)
    mask[0, 200, 300] = True  # one pixel (a microaneurysm at 1/2 scale)
    target = model_target(mask, 256)
    assert target.shape == (4, 256, 256) and target[0].sum() >= 1 and target[1:].sum() == 0
    grey = model_input(torch.rand(1, 64, 64), 256)[0]
    assert torch.equal(grey[0], grey[2])


def test_weights_files_round_trip(tmp_path):
    from test_tpdrseg_model import tiny_model
    from lib.tpdrseg import training as core

    model = tiny_model()
    path = str(tmp_path / "w" / "tpdrseg.pt")
    write_weights(path, model, "minilm", {"validation": {"metrics": {"mDice": float("nan"), "auc": 0.5}}})
    state, meta = read_weights(path)
    assert meta["model"] == model.config and meta["text_encoder"] == "minilm"
    assert set(state) == set(model.trainable_state())
    with open(str(tmp_path / "w" / "tpdrseg.json")) as f:
        side = json.load(f)  # strict JSON: the NaN became null
    assert side["validation"]["metrics"] == {"mDice": None, "auc": 0.5}
    core.save_trained(model, str(tmp_path / "cli"), {"steps": []})  # the trainer CLI's folder
    state2, meta2 = read_weights(str(tmp_path / "cli"))
    assert meta2["model"] == model.config and all(torch.equal(state[k], state2[k]) for k in state)
    assert finite({"a": [math.inf, 1.0]}) == {"a": [None, 1.0]}
    half = str(tmp_path / "half" / "tpdrseg.pt")  # --fp16 of scripts/export_tpdrseg_weights.py: half the size
    write_weights(half, model, "minilm", {}, dtype=torch.float16)
    stored = torch.load(half, weights_only=True)["trainable_state"]
    assert all(v.dtype == torch.float16 for v in stored.values())
    state3, _ = read_weights(half)  # back to float32, within float16 rounding
    assert all(state3[k].dtype == torch.float32 and torch.allclose(state3[k], state[k], rtol=2 ** -11, atol=1e-7)
               for k in state)


# -- through the server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpdrseg")
    studies = copy_sample_data(os.path.join(str(root), "studies"))
    srv = Server(studies, os.path.join(str(root), "server.log"),
                 conf={"models_dir": os.path.join(str(root), "model"),
                       "tpdrseg_weights": os.path.join(str(root), "none", "tpdrseg.pt")}).start()
    yield srv
    srv.stop()


def post(server, params: dict, image: str = IMAGE):
    return requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params)}, timeout=600)


def infer(server, params: dict, image: str = IMAGE) -> tuple[dict, np.ndarray]:
    """(result JSON, label array in the image's voxel order: (X, Y) for a PNG)."""
    response = post(server, params, image)
    assert response.status_code == 200, response.text
    result, label = None, None
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        else:
            name = os.path.basename(disposition.split("filename=")[1].strip('"'))
            path = os.path.join(server.studies, "..", name)
            with open(path, "wb") as f:
                f.write(part.content)
            label = read_label(path)
    return result, label


def truth(server) -> np.ndarray:
    return read_label(os.path.join(server.studies, "labels", "final", f"{IMAGE}.png"))


def test_info_lists_the_classes_and_the_text_encoder(server):
    info = server_info(server)
    model = info["models"][MODEL]
    assert [c["key"] for c in model["classes"]] == CLASSES
    assert [c["label"] for c in model["classes"]] == [1, 2, 3, 4]
    ex = model["classes"][2]
    assert ex["abbreviation"] == "EX" and "hard exudate" in ex["synonyms"] and ex["prompt"] and ex["description"]
    assert model["text_encoder"] == "minilm"
    assert model["weights"]["configured_present"] is False and model["weights"]["trained_present"] is False
    assert MODEL in info["trainers"]


def test_missing_weights_are_a_503_that_says_how_to_train(server):
    response = post(server, {"text": "hard exudates"})
    assert response.status_code == 503, response.text
    assert "python -m lib.tpdrseg.training" in response.text and "/train/tpdrseg" in response.text


def test_a_training_request_without_lesion_labels_is_answered_clearly(server):
    start_training(server, MODEL, {"images": ["retina", "nuclei"], "steps": 1})
    task, _ = wait_for_training(server, MODEL, timeout=300)
    assert task["status"] == "ERROR"
    error = server_info(server)["train_stats"][MODEL]["error"]
    assert "no datastore image has a fundus lesion label" in error
    assert "retina: 77% of the image is labelled" in error and "nuclei: label values" in error


def test_training_on_the_datastore_label_publishes_weights_and_metrics(server):
    start_training(server, MODEL, {"steps": 2, "batch_size": 1})
    task, seen = wait_for_training(server, MODEL, timeout=600)
    assert task["status"] == "DONE", task["details"][-20:]
    steps = [s["step"] for s in seen if s.get("status") == "training"]
    assert not steps or max(steps) <= 2
    stats = server_info(server)["train_stats"][MODEL]
    assert stats["status"] == "done" and stats["images"] == [IMAGE] and stats["steps"] == 2
    assert any(s["id"] == "retina" for s in stats["skipped"])
    metrics = stats["validation"]["metrics"]
    assert set(CLASSES) <= set(metrics) and {"mDice", "mAUC_ROC", "mAUC_PR"} <= set(metrics)
    assert "training images" in stats["validation"]["on"]  # one labelled image: nothing held out, and it says so
    weights = server_info(server)["models"][MODEL]["weights"]
    assert weights["trained_present"] and weights["trained_info"]["steps"] == 2
    assert os.path.isfile(weights["trained"]) and os.path.isfile(weights["trained"][:-3] + ".json")


def test_a_typed_class_and_its_synonyms_give_one_class_mask_of_the_image_shape(server):
    shape = truth(server).shape
    results = {}
    for typed in ("hard exudates", "EX", "hard exudate"):
        result, label = infer(server, {"text": typed})
        assert label.shape == shape == tuple(result["image_shape"])
        assert set(np.unique(label).tolist()) <= {0, 3}
        assert result["prompt"]["mode"] == "class" and result["prompt"]["matched"]["class"] == "hard_exudates"
        assert result["prompt"]["embedded"] == CATALOGUE.by_key["hard_exudates"].prompt
        assert result["label_names"] == {"hard_exudates": 3} and result["weights"]["source"] == "trained"
        results[typed] = label
    assert np.array_equal(results["EX"], results["hard exudates"])
    assert np.array_equal(results["hard exudate"], results["hard exudates"])
    result, label = infer(server, {"label": "cotton wool spots", "threshold": 0.3, "label_value": 7})
    assert result["prompt"]["matched"]["class"] == "soft_exudates" and result["threshold"] == 0.3
    assert set(np.unique(label).tolist()) <= {0, 7}


def test_free_text_is_embedded_as_typed_and_says_so(server):
    typed = "small shiny yellow flecks near the fovea"
    result, label = infer(server, {"text": typed})
    assert result["prompt"] == {"mode": "free text", "text": typed, "matched": None, "embedded": typed}
    assert label.shape == truth(server).shape and set(np.unique(label).tolist()) <= {0, 1}


def test_all_gives_one_multi_label_result_with_four_names(server):
    result, label = infer(server, {"text": "all"})
    assert result["label_names"] == {name: k + 1 for k, name in enumerate(CLASSES)}
    assert [c["class"] for c in result["classes"]] == CLASSES
    assert label.shape == truth(server).shape and set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    assert sum(c["pixels"] for c in result["classes"]) == result["mask_pixels"] == int((label > 0).sum())
    assert server_info(server)["models"][MODEL]["text_encoder_loaded"] is True


def test_a_slice_of_a_volume_is_answered_on_that_slice(server):
    result, label = infer(server, {"text": "haemorrhages", "slice": 90, "axis": 2, "threshold": 0.01},
                          image="colin27_t1")
    assert label.shape == (181, 217, 181) and result["slice"] == 90 and result["axis"] == 2
    assert not label[:, :, :90].any() and not label[:, :, 91:].any()


@pytest.mark.parametrize("params, expected", [
    ({"text": ""}, "empty 'text'"),
    ({"text": "the"}, "names no lesion"),
    ({"text": "EX", "threshold": 2}, "'threshold' must be between 0 and 1"),
    ({"text": "EX", "weights": "newest"}, "'weights' must be auto, trained or configured"),
])
def test_bad_requests_are_answered_clearly(server, params, expected):
    response = post(server, params)
    assert response.status_code == 400 and expected in response.text, response.text
    if "text" in params and params["text"] in ("", "the"):
        assert "Microaneurysms" in response.text and "Hard exudates" in response.text


def test_the_configured_weights_are_still_missing(server):
    response = post(server, {"text": "EX", "weights": "configured"})
    assert response.status_code == 503 and "not found" in response.text


# -- through a server with the SHIPPED weights: segmentation quality on SYNTHETIC lesions -----------------------
# The weights the app ships (exported by scripts/export_tpdrseg_weights.py from the trainer runs): descriptions at the
# configured default path, bare class names (the paper's ablation) beside it. These tests skip while a file is absent.
SHIPPED_DESCRIPTION_WEIGHTS = DEFAULT_WEIGHTS
SHIPPED_NAME_WEIGHTS = os.path.join(REPO, "lib", "tpdrseg", "weights", "tpdrseg_litemedsam_names.pt")
HELD_OUT_IMAGES = 4  # test-split images uploaded to the datastore: 4 x 4 single-class requests per model, ~1 s each

# What typing each text on the sample image must reach: Dice of the answer against that class of the sample's label.
# The sample is held out (seed split 2 of lib/tpdrseg/dataset.py; training uses splits 0 and 1).
SAMPLE_TEXTS = {"hard exudates": "hard_exudates", "EX": "hard_exudates", "haemorrhages": "haemorrhages",
                "microaneurysms": "microaneurysms", "cotton wool spots": "soft_exudates"}
# Measured 2026-11-26 with the shipped weights (one CPU thread): MA 0.354, HE 0.701, EX 0.533 (typed "hard exudates"
# and "EX" alike), SE 0.523. Thresholds about 80% of that, for thread-count and platform float differences; every one
# is far above zero-shot LiteMedSAM, which cannot tell the classes apart (README: Dice under 0.03 for every class).
MIN_SAMPLE_DICE = {"microaneurysms": 0.28, "haemorrhages": 0.56, "hard_exudates": 0.42, "soft_exudates": 0.42}
# Dice per class over the HELD_OUT_IMAGES test images (pixels pooled, as lesion_metrics), description weights.
# Measured: MA 0.206, HE 0.717, EX 0.515, SE 0.621 -> about 80%.
MIN_HELD_OUT_DICE = {"microaneurysms": 0.16, "haemorrhages": 0.57, "hard_exudates": 0.41, "soft_exudates": 0.50}
# Mean over classes of that Dice: descriptions minus bare names (the paper's claim: descriptions help).
# Measured: 0.210 (descriptions MA/HE/EX/SE 0.206/0.717/0.515/0.621, names 0.084/0.531/0.269/0.336). The shipped
# description weights had 300 steps, the names weights 240; at equal steps (240, all 20 test images, the trainer's
# evaluation) the margin was 0.16 mDice. Threshold 0.10: the paper's claim, with room for float differences.
MIN_DESCRIPTION_MARGIN = 0.10


def skip_unless_shipped(path: str) -> None:
    if not os.path.isfile(path):
        pytest.skip(f"SHIPPED TP-DRSeg WEIGHTS MISSING: {path} -- export a trainer run with "
                    f"`python scripts/export_tpdrseg_weights.py RUN_DIR {path}`")


@functools.lru_cache(maxsize=1)
def held_out_images() -> dict:
    """{datastore id: (image (H, W, 3) uint8, masks (K, H, W))}: the first HELD_OUT_IMAGES test-split images that
    hold all four classes (so that every class's Dice has positives)."""
    from lib.tpdrseg.dataset import ensure_dataset, load_dataset
    from lib.tpdrseg.training import DEFAULT_DATA

    images, masks, _ = load_dataset(ensure_dataset(DEFAULT_DATA), "test")
    chosen = [i for i in range(len(images)) if masks[i].reshape(len(CLASSES), -1).any(1).all()][:HELD_OUT_IMAGES]
    return {f"fundus_test_{i:02d}": (images[i], masks[i] > 0) for i in chosen}


def start_shipped_server(root, weights: str) -> Server:
    """A server over the sample data + the held-out test images (PNG, in the datastore), serving `weights`; the
    configured default path is served without any conf, as a user gets it."""
    from PIL import Image

    studies = copy_sample_data(os.path.join(str(root), "studies"))
    for image_id, (image, _) in held_out_images().items():
        Image.fromarray(image).save(os.path.join(studies, f"{image_id}.png"))
    conf = {"models_dir": os.path.join(str(root), "model")}  # empty: no trained weights to prefer
    if weights != DEFAULT_WEIGHTS:
        conf["tpdrseg_weights"] = weights
    return Server(studies, os.path.join(str(root), "server.log"), conf=conf).start()


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    skip_unless_shipped(SHIPPED_DESCRIPTION_WEIGHTS)
    srv = start_shipped_server(tmp_path_factory.mktemp("tpdrseg_shipped"), SHIPPED_DESCRIPTION_WEIGHTS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def names_server(tmp_path_factory):
    skip_unless_shipped(SHIPPED_NAME_WEIGHTS)
    srv = start_shipped_server(tmp_path_factory.mktemp("tpdrseg_names"), SHIPPED_NAME_WEIGHTS)
    yield srv
    srv.stop()


def held_out_dice(server) -> dict:
    """{class: Dice} over the held-out images, each class typed by its name (one request per image and class);
    intersections and sizes summed over the images."""
    overlap, size = dict.fromkeys(CLASSES, 0), dict.fromkeys(CLASSES, 0)
    for image_id, (_, masks) in held_out_images().items():
        for k, key in enumerate(CLASSES):
            result, label = infer(server, {"text": CATALOGUE.by_key[key].name}, image=image_id)
            assert result["prompt"]["matched"]["class"] == key
            answer, target = label.T > 0, masks[k]  # (X, Y) -> (rows, cols)
            overlap[key] += int((answer & target).sum())
            size[key] += int(answer.sum() + target.sum())
    return {key: 2.0 * overlap[key] / size[key] for key in CLASSES}


@pytest.fixture(scope="module")
def description_dice(shipped_server) -> dict:
    return held_out_dice(shipped_server)


def test_shipped_weights_segment_typed_classes_on_the_held_out_sample(shipped_server):
    target = truth(shipped_server)
    for typed, key in SAMPLE_TEXTS.items():
        result, label = infer(shipped_server, {"text": typed})
        assert result["weights"] == {"path": SHIPPED_DESCRIPTION_WEIGHTS, "source": "configured"}
        assert result["prompt"]["matched"]["class"] == key
        value = CATALOGUE.by_key[key].label
        score = dice(label == value, target == value)
        print(f"sample, {typed!r}: Dice {score:.3f} (at least {MIN_SAMPLE_DICE[key]})")
        assert score >= MIN_SAMPLE_DICE[key], (typed, score)


def test_shipped_weights_dice_on_held_out_test_images(description_dice):
    print(f"held-out Dice, descriptions: {description_dice}")
    for key in CLASSES:
        assert description_dice[key] >= MIN_HELD_OUT_DICE[key], (key, description_dice)


def test_descriptions_beat_bare_class_names(description_dice, names_server):
    names_dice = held_out_dice(names_server)
    margin = np.mean(list(description_dice.values())) - np.mean(list(names_dice.values()))
    print(f"held-out Dice, names: {names_dice}; mean descriptions - names = {margin:.3f}")
    assert margin >= MIN_DESCRIPTION_MARGIN, (description_dice, names_dice)
