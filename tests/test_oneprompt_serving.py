"""One-Prompt served as model `oneprompt` (Wu et al., CVPR 2024; lib/oneprompt/infer.py): templates registered with each
prompt kind, segmentation of another slice, of the unlabelled images by batch inference (a 13-slice slab of Colin27
and a second brain, the sample data's MNI152 template), template ensembling, segment-everything, a 2D image, and clear
answers to bad requests. One server for the module; the template slice is encoded once and cached. The module costs
about a minute on one CPU thread plus the batch test's 189 MNI152 slices (~0.7 s each on CPU)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from helpers import SAMPLE_DATA, aal_on_grid, dice, read_label, server_info, start_on_sample_data

MODEL = "oneprompt"
IMAGE = "colin27_t1"
SLAB = "colin27_slab"  # an unlabelled image written by the test: 13 axial slices of Colin27 around the template slice
SECOND_STUDY = "mni152_t1"  # the sample data's unlabelled second brain (MNI152 2009a; no stored label)
SLAB_HALF = 6
NEARBY_MM = 4  # the query slice lies this far from the template slice (1 mm voxels)
with open(os.path.join(SAMPLE_DATA, "labels", "colin27_aal_names.json")) as f:
    AAL = {name: int(value) for value, name in json.load(f).items()}
PUTAMEN_L = AAL["Putamen_L"]

# Thresholds, measured with the shipped weights (Putamen is a held-out task: no training step saw it):
# - a slice 4 mm from the template, click + box templates ensembled: 0.535 (click alone 0.523). The threshold, 0.45,
#   sits above the training-free prototype baseline on held-out Putamen_L (0.375, bench_oneprompt.py) with a margin
#   for thread-count float differences; LiteMedSAM given the box copied onto the query does better on this one
#   well-aligned structure (0.68), not on the held-out tasks as a whole (README);
# - the whole 13-slice slab of Colin27 (batch inference): 0.470 -> 0.40;
# - segment everything on the template slice: 40 masks from 49 clicks (the paper: about 50) -> at least 20.
MIN_DICE_SLICE = 0.45
MIN_DICE_VOLUME = 0.40
# - whole volumes, with the volume gate (lib.oneprompt.infer.consistent_run; margin 0.1, chosen on 12 TRAINING AAL
#   structures; the default on another study): the second study (MNI152, 189 slices, batch inference; truth AAL
#   carried through the affines, approximate): 0.309, 33 slices labelled -> 0.25. Without the gate 142 slices
#   labelled, Dice 0.135. At most 1.5 labelled slices per slice that holds the structure (measured 1.22); the
#   labelled slices' IoU with the true extent 0.82 (33 labelled, 27 hold it) -> 0.5 (issue 17).
MIN_DICE_SECOND_STUDY = 0.25
MAX_LABELLED_SLICES_PER_HELD = 1.5
MIN_SLICE_OVERLAP_SECOND_STUDY = 0.5
MIN_EVERYTHING_MASKS = 20
# - `volume: propagate` (lib/oneprompt/volume.py; the default on the template's own volume; click + box templates,
#   seeded from the box): Colin27 whole 0.437 (34 slices visited, 32 labelled where 27 hold the putamen; the
#   benchmark's box template: 0.438, the gate 0.318) -> 0.38; the 13-slice slab from a located seed 0.485 -> 0.40
MIN_DICE_PROPAGATED = 0.38
MIN_DICE_PROPAGATED_SLAB = 0.40


def aal() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(os.path.join(SAMPLE_DATA, "labels", "final", f"{IMAGE}.nii.gz"))
    return np.asarray(img.dataobj).round().astype(np.int32), img.affine


def template_slice() -> int:
    """The axial slice with the largest Putamen_L cross-section."""
    return int(np.argmax((aal()[0] == PUTAMEN_L).sum((0, 1))))


def write_slab(studies: str) -> None:
    """The slab of Colin27 centred on the template slice, with its own geometry (origin moved to its first slice)."""
    img = nib.load(os.path.join(studies, f"{IMAGE}.nii.gz"))
    k0 = template_slice() - SLAB_HALF
    data = np.asarray(img.dataobj)[:, :, k0:k0 + 2 * SLAB_HALF + 1]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, k0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, affine), os.path.join(studies, f"{SLAB}.nii.gz"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_on_sample_data(tmp_path_factory.mktemp("oneprompt"), prepare=write_slab)
    yield srv
    srv.stop()


def infer(server, params: dict, image: str = IMAGE, tmp=None) -> tuple[dict, np.ndarray, str]:
    """(result JSON, label array, label file) of /infer/oneprompt."""
    response = post(server, params, image)
    assert response.status_code == 200, response.text
    result, label, path = None, None, None
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        else:
            name = disposition.split("filename=")[1].strip('"')
            path = os.path.join(server.studies, "..", os.path.basename(name))
            with open(path, "wb") as f:
                f.write(part.content)
            label = read_label(path)
    return result, label, path


def post(server, params: dict, image: str = IMAGE) -> requests.Response:
    return requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params)}, timeout=600)


def putamen_prompts(k: int) -> dict:
    mask = aal()[0][:, :, k] == PUTAMEN_L
    i, j = np.nonzero(mask)
    centre = [int(np.median(i)), int(np.median(j)), k]
    inside = [[int(a), int(b), k] for a, b in zip(i[::15], j[::15])]
    return {"click": {"foreground": [centre], "background": []},
            "bbox": {"roi": [int(i.min()), int(i.max()), int(j.min()), int(j.max()), k, k]},
            "doodle": {"doodle_foreground": inside, "doodle_background": [[int(i.max()) + 8, centre[1], k]]},
            "seglab": {"seglab_label": "final", "seglab_value": PUTAMEN_L, "slice": k}}


def test_templates_of_each_prompt_kind_are_registered_and_listed(server):
    k = template_slice()
    prompts = putamen_prompts(k)
    shape = aal()[0].shape
    for kind, label in (("click", "Putamen_L"), ("bbox", "Putamen_L"), ("doodle", "Putamen_L_doodle"),
                        ("seglab", "Putamen_L_seglab")):
        result, preview, _ = infer(server, {"mode": "register", "label": label, **prompts[kind]})
        assert result["prompt"] == kind and result["slice"] == k and result["axis"] == 2, result
        assert result["template"].startswith(f"{label}/")
        assert preview.shape == shape  # the preview: the template's own mask on its slice, nothing elsewhere
        assert not np.delete(preview, k, axis=2).any()
        print(f"{kind} template {result['template']}: preview {result['mask_voxels']} voxels, Dice "
              f"{dice(preview[:, :, k] > 0, aal()[0][:, :, k] == PUTAMEN_L):.3f}")

    templates = server_info(server)["models"][MODEL]["templates"]
    assert templates["Putamen_L"]["templates"] == 2 and templates["Putamen_L"]["prompt_kinds"] == ["bbox", "click"]
    assert templates["Putamen_L_doodle"]["prompt_kinds"] == ["doodle"]
    assert templates["Putamen_L_seglab"]["prompt_kinds"] == ["seglab"]
    source = templates["Putamen_L"]["sources"][0]
    assert source["image"] == IMAGE and source["slice"] == k and source["modality"] == "MR"


def test_a_nearby_slice_is_segmented_by_the_ensembled_templates(server):
    k = template_slice() + NEARBY_MM
    truth, affine = aal()
    result, label, path = infer(server, {"template": "Putamen_L", "slices": [k, k + 1]})
    assert result["mode"] == "segment" and result["templates"] == ["Putamen_L/1", "Putamen_L/2"]
    assert label.shape == truth.shape and np.allclose(nib.load(path).affine, affine, atol=1e-4)
    assert not np.delete(label, k, axis=2).any()  # only the requested slab
    score = dice(label[:, :, k] > 0, truth[:, :, k] == PUTAMEN_L)
    one, single, _ = infer(server, {"template": "Putamen_L", "templates": ["Putamen_L/1"], "slices": [k, k + 1]})
    assert one["templates"] == ["Putamen_L/1"]
    single_score = dice(single[:, :, k] > 0, truth[:, :, k] == PUTAMEN_L)
    print(f"Putamen_L {NEARBY_MM} mm from the template: Dice {score:.3f} with 2 templates (click + box), "
          f"{single_score:.3f} with the click template alone")
    assert score >= MIN_DICE_SLICE


def test_batch_inference_segments_the_unlabelled_images_whole(server):
    # multi_gpu off: MONAI Label's batch task divides by the number of GPUs when it is on (ZeroDivisionError on CPU).
    # Generous timeout: every one of MNI152's 189 axial slices goes through the model (~0.7 s each on CPU).
    response = requests.post(f"{server.url}/batch/infer/{MODEL}", params={"images": "unlabeled", "run_sync": "true"},
                             json={"template": "Putamen_L", "max_workers": 1, "device": "cpu", "multi_gpu": False},
                             timeout=1800)
    assert response.status_code == 200, response.text
    results = response.json()
    # the unlabelled images: the slab written by this module and the sample data's second brain (every other sample
    # image has a final label)
    assert set(results) == {SLAB, SECOND_STUDY}, results
    assert results[SLAB]["params"]["slices"] == [0, 2 * SLAB_HALF + 1]
    saved = os.path.join(server.studies, "labels", "original", f"{SLAB}.nii.gz")
    image = nib.load(os.path.join(server.studies, f"{SLAB}.nii.gz"))
    label = nib.load(saved)
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4)
    k0 = template_slice() - SLAB_HALF
    truth = aal()[0][:, :, k0:k0 + 2 * SLAB_HALF + 1] == PUTAMEN_L
    score = dice(np.asarray(label.dataobj) > 0, truth)
    print(f"Putamen_L on the whole {2 * SLAB_HALF + 1}-slice slab (batch inference): Dice {score:.3f}; "
          f"{results[SLAB]['params']['labelled_slices']} slices labelled")

    # the second brain: another subject (an average of 152) in Colin27's MNI space; truth = AAL carried onto its grid
    # through both affines (nearest voxel), APPROXIMATE since AAL was drawn on Colin27
    image = nib.load(os.path.join(server.studies, f"{SECOND_STUDY}.nii.gz"))
    label = nib.load(os.path.join(server.studies, "labels", "original", f"{SECOND_STUDY}.nii.gz"))
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4)
    assert results[SECOND_STUDY]["params"]["slices"] == [0, image.shape[2]]
    truth = aal_on_grid(image.shape, image.affine) == PUTAMEN_L
    second_score = dice(np.asarray(label.dataobj) > 0, truth)
    print(f"Putamen_L on the whole second study ({SECOND_STUDY}, {image.shape[2]} axial slices, batch inference; "
          f"truth: AAL carried through the affines, approximate): Dice {second_score:.3f}; "
          f"{results[SECOND_STUDY]['params']['labelled_slices']} slices labelled, "
          f"{int(truth.any((0, 1)).sum())} hold the structure")
    assert score >= MIN_DICE_VOLUME
    assert second_score >= MIN_DICE_SECOND_STUDY
    held, labelled = truth.any((0, 1)), (np.asarray(label.dataobj) > 0).any((0, 1))
    assert labelled.sum() <= MAX_LABELLED_SLICES_PER_HELD * held.sum()
    # Issue 17: another study's answer lands on the right slices (labelled slices against the true extent)
    slice_overlap = (labelled & held).sum() / (labelled | held).sum()
    print(f"second study: labelled slices {int(labelled.sum())}, true extent {int(held.sum())}, "
          f"slice IoU {slice_overlap:.2f}")
    assert slice_overlap >= MIN_SLICE_OVERLAP_SECOND_STUDY


def test_propagation_from_the_template_slice_and_from_a_located_seed(server):
    """The default on the template's own volume is `volume: propagate`: it starts from the template slice (the box
    template's seed, not the click's) and visits only the slices around the structure; on another image (the
    13-slice slab, its own geometry) the seed is located first."""
    truth = aal()[0] == PUTAMEN_L
    k = template_slice()
    result, label, _ = infer(server, {"template": "Putamen_L"})
    volume = result["volume"]
    assert volume["method"] == "propagate" and volume["seed_slice"] == k and "Putamen_L/2" in volume["seed"]
    held, labelled = truth.any((0, 1)), (label > 0).any((0, 1))
    score = dice(label > 0, truth)
    print(f"Putamen_L propagated through Colin27: Dice {score:.3f}, {volume['visited_slices']} slices visited, "
          f"{int(labelled.sum())} labelled ({int(held.sum())} hold it); stopped {volume['stopped']}")
    assert result["labelled_slices"] == int(labelled.sum()) and labelled[k]
    assert volume["visited_slices"] < truth.shape[2] // 2 and score >= MIN_DICE_PROPAGATED

    result, label, _ = infer(server, {"template": "Putamen_L", "volume": "propagate"}, image=SLAB)
    k0 = k - SLAB_HALF
    slab_truth = truth[:, :, k0:k0 + 2 * SLAB_HALF + 1]
    assert result["volume"]["seed"] in ("oneprompt", "copied box") and label.shape == slab_truth.shape
    slab_score = dice(label > 0, slab_truth)
    print(f"Putamen_L propagated through the slab from a located seed (slice {result['volume']['seed_slice']}, "
          f"{result['volume']['seed']}): Dice {slab_score:.3f}")
    assert slab_score >= MIN_DICE_PROPAGATED_SLAB


def test_segment_everything_answers_one_multi_label_slice(server):
    k = template_slice()
    result, label, _ = infer(server, {"mode": "everything", "slice": k})
    assert label.shape == aal()[0].shape and not np.delete(label, k, axis=2).any()
    values = set(np.unique(label).tolist()) - {0}
    assert values <= set(result["label_names"].values()) == {o["label"] for o in result["objects"]}
    assert result["prompts"] >= 30 and result["masks"] == len(result["objects"]) >= MIN_EVERYTHING_MASKS
    print(f"segment everything: {result['prompts']} clicks -> {result['masks']} masks")


def test_a_2d_image_is_prompted_and_answered_as_a_2d_label(server):
    result, label, _ = infer(server, {"mode": "interactive", "foreground": [[200, 300]], "label": "nucleus"},
                             image="nuclei")
    assert result["axis"] is None and label.shape == (512, 512) and label.dtype == np.uint8


def test_a_template_on_a_2d_image_segments_a_2d_image(server):
    """A box template registered on the nuclei image, then `segment` of that image: a 2D label of the image's shape
    (the volume pipeline is for volumes only; nuclei are a modality no training task has, README: Dice ~0.01)."""
    box = [446, 483, 299, 324]  # x0, x1, y0, y1 of the largest nucleus of sample-data/labels/final/nuclei.png
    result, preview, _ = infer(server, {"mode": "register", "label": "nucleus_2d", "roi": box}, image="nuclei")
    assert result["axis"] is None and result["template"].startswith("nucleus_2d/")
    result, label, _ = infer(server, {"template": "nucleus_2d"}, image="nuclei")
    assert result["mode"] == "segment" and result["axis"] is None and result["volume"] is None
    assert label.shape == (512, 512) and label.dtype == np.uint8 and (label > 0).sum() == result["mask_voxels"]


@pytest.mark.parametrize("params, status, message", [
    ({"template": "No_Such"}, 404, "unknown template"),
    ({"mode": "register", "label": "X"}, 400, "no prompt"),
    ({"mode": "register", "label": "X", "roi": [60, 60, 120, 140, 66, 66]}, 400, "empty box"),
    ({"mode": "interactive", "foreground": [[500, 10, 66]]}, 400, "outside the image"),
    ({"mode": "paint", "foreground": [[60, 120, 66]]}, 400, "'mode' must be"),
    ({"mode": "register", "foreground": [[60, 120, 66]]}, 400, "name the structure"),
    ({"template": "Putamen_L", "slices": [10, 5]}, 400, "'slices'"),
    ({"mode": "register", "label": "X", "seglab_label": "final", "seglab_value": 250}, 400, "no voxel"),
    ({"mode": "interactive", "foreground": [[60, 120, 66]], "axis": 5}, 400, "'axis'"),
    ({}, 400, "no prompt"),
    ({"template": "Putamen_L", "gate_margin": -1}, 400, "'gate_margin'"),
    ({"template": "Putamen_L", "volume": "maybe"}, 400, "'volume'"),
])
def test_bad_requests_are_answered_clearly(server, params, status, message):
    response = post(server, params)
    assert response.status_code == status and message in response.text, response.text


# -- the serving preprocessing and geometry, without the server ----------------------------------------------------
def test_slices_are_preprocessed_as_the_training_data_and_masks_map_back():
    """The encoder input equals the training pipeline's (lib.oneprompt.dataset: crop to non-zero, z-score,
    bicubic resize to 256, to_unit), and a mask survives the trip to model pixels and back."""
    from monai.transforms import CropForeground, Resize

    from lib.oneprompt.frame import SliceFrame, slice_shape, slice_window
    from lib.oneprompt.preprocessing import model_input, nonzero, nonzero_box, to_unit
    from lib.core.transforms.geometry import extract_slice
    from lib.core.transforms.intensity import apply_intensity_range
    from lib.core.images import load_image

    image = load_image(os.path.join(SAMPLE_DATA, f"{IMAGE}.nii.gz"))
    _, intensity = image.intensity()
    k = template_slice()
    frame = SliceFrame(slice_window(nonzero_box(image), 2), slice_shape(image, 2))
    served = model_input(image, 2, k, intensity, frame)
    cropped = CropForeground(select_fn=nonzero, margin=0, allow_smaller=True)(image.array)
    z = apply_intensity_range(extract_slice(np.asarray(cropped), 2, k), intensity, "zscore")
    trained = to_unit(np.asarray(Resize((256, 256), mode="bicubic", anti_aliasing=True)(z)))
    assert served.shape == (3, 256, 256) and np.allclose(served.numpy(), trained, atol=1e-5)

    mask = (aal()[0][:, :, k] == PUTAMEN_L).T  # (rows, cols)
    model_mask = frame.mask_to_model(mask)
    back = frame.to_slice(torch_tensor(model_mask)) > 0.5
    assert dice(back.numpy(), mask) > 0.9
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = frame.box_to_model((rows.min(), cols.min(), rows.max(), cols.max()))
    ys, xs = np.nonzero(model_mask)
    assert abs(x0 - xs.min()) <= 1.5 and abs(x1 - xs.max()) <= 1.5 and abs(y0 - ys.min()) <= 1.5
    assert abs(y1 - ys.max()) <= 1.5
    x, y = frame.points_to_model(np.array([[rows[0], cols[0]]]))[0]
    assert model_mask[int(round(y)), int(round(x))]


def torch_tensor(array):
    import torch

    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def test_the_volume_gate_keeps_the_unbroken_template_like_run_of_slices():
    from lib.oneprompt.infer import consistent_run

    indices = list(range(10))
    # slices 3-6 hold the structure (similar to the template), 8 looks similar again but is cut off by 7;
    # slice 1 has no prediction at all
    similarity = {0: 0.5, 2: 0.8, 3: 0.93, 4: 0.97, 5: 0.95, 6: 0.9, 7: 0.6, 8: 0.96, 9: 0.5}
    assert consistent_run(indices, similarity, margin=0.1) == [3, 4, 5, 6]
    assert consistent_run(indices, similarity, margin=0.5) == [2, 3, 4, 5, 6, 7, 8, 9]  # slice 1 breaks the run
    assert consistent_run(indices[4:7], {5: 0.9}, margin=0.1) == [5]
    assert consistent_run(indices, {}, margin=0.1) == []


def test_prototype_consistency_tells_the_template_structure_from_other_tissue():
    import torch

    from lib.oneprompt.infer import prototype_consistency
    from lib.oneprompt.model import masked_prototype

    g = torch.Generator().manual_seed(0)
    structure, tissue = torch.randn(16, generator=g), torch.randn(16, generator=g)
    neck = tissue[None, :, None, None].repeat(1, 1, 64, 64) + 0.1 * torch.randn(1, 16, 64, 64, generator=g)
    neck[:, :, 20:30, 20:30] += structure[None, :, None, None] - tissue[None, :, None, None]
    template = torch.zeros(256, 256, dtype=torch.bool)
    template[80:120, 80:120] = True  # the structure's cells, 20-30, in model pixels (stride 4)
    prototype = torch.nn.functional.normalize(masked_prototype(neck, template.float()[None, None]), dim=1)
    elsewhere = torch.zeros_like(template)
    elsewhere[160:200, 160:200] = True
    assert prototype_consistency(neck, template, prototype) > 0.99
    assert prototype_consistency(neck, elsewhere, prototype) < 0.5
