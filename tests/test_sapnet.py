"""SAP-Net and the SAMauto volume pipeline (SAM^Med's coarse segmentation): the pieces behave as the paper says, and
on a real volume two annotated slices segment the whole structure far better than copying the annotations."""

import json
import os
import time

import numpy as np
import pytest
import torch

from helpers import REPO
from lib.core.cache import EmbeddingKey
from lib.core.evaluation import dice
from lib.sammed.auto_segment import AutoSegmentSettings, auto_segment, select_components, stack_to_volume
from lib.core.cache import LRUCache
from lib.core.predictor import ObjectMemory, PromptPredictor
from lib.models.sam import build_litemedsam
from lib.sammed.samassist import select_training_slices
from lib.sammed.sapnet import (FourierPositionEncoding, SAPNetLearner, SAPNetSettings, biased_dice_loss,
                                 keep_largest_components, load_sapnet, masked_prototypes)
from lib.core.transforms import Window, apply_intensity_range, compute_intensity_range, extract_slice
from lib.core.images import load_image

DATA = os.path.join(REPO, "sample-data")


def test_fourier_position_encoding_is_bounded_fixed_by_its_seed_and_saved():
    encoding = FourierPositionEncoding(64, sigma=2.0, seed=3)
    gamma = encoding((64, 64))
    assert gamma.shape == (64, 64, 64) and float(gamma.abs().max()) <= 1.0
    cos, sin = gamma[:32], gamma[32:]
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-5)  # one unit circle per frequency
    assert torch.equal(FourierPositionEncoding(64, 2.0, seed=3)((64, 64)), gamma)
    assert not torch.allclose(FourierPositionEncoding(64, 2.0, seed=4)((64, 64)), gamma)
    # A frequency matrix scaled by sigma: its spread follows sigma.
    assert 1.0 < float(encoding.frequencies.std()) < 3.0 and encoding.frequencies.shape == (2, 32)
    other = FourierPositionEncoding(64, 2.0, seed=99)
    other.load_state_dict(encoding.state_dict())  # B travels with the state dict, not with the seed
    assert torch.equal(other((64, 64)), gamma)
    with pytest.raises(ValueError):
        FourierPositionEncoding(63)


def test_biased_dice_penalises_false_positives_more_than_false_negatives():
    target = torch.zeros(20, 20)
    target[:10, :10] = 1  # 100 pixels
    extra = target.clone()
    extra[10:12, :10] = 1  # 20 false positives
    missing = target.clone()
    missing[8:10, :10] = 0  # 20 false negatives
    loss = lambda p, beta: float(biased_dice_loss(p, target, beta, eps=0.0))
    # beta = 1 is the plain Dice: 20 FP cost 1 - 200/220, 20 FN cost 1 - 160/180, about the same.
    assert loss(extra, 1.0) == pytest.approx(1 - 200 / 220) and loss(missing, 1.0) == pytest.approx(1 - 160 / 180)
    # beta = 2: the same 20 FP now cost 1 - 200/240 = 0.167, the 20 FN still 0.111.
    assert loss(extra, 2.0) == pytest.approx(1 - 200 / 240) and loss(missing, 2.0) == pytest.approx(1 - 160 / 180)
    assert loss(extra, 2.0) > 1.4 * loss(missing, 2.0)
    assert loss(target, 2.0) == 0.0


def test_masked_prototypes_average_each_class_over_the_slices_that_have_it():
    features = torch.zeros(2, 3, 4, 4)
    features[:, 0] = 1.0  # background feature
    features[0, :, :2, :2] = torch.tensor([0.0, 2.0, 0.0])[:, None, None]  # foreground of slice 0
    foreground = torch.zeros(2, 4, 4)
    foreground[0, :2, :2] = 1  # slice 1 has no foreground: only its background counts
    background, fg = masked_prototypes(features, foreground)
    assert torch.allclose(fg, torch.tensor([0.0, 2.0, 0.0])) and torch.allclose(background, torch.tensor([1.0, 0, 0]))
    assert masked_prototypes(features, torch.zeros(2, 4, 4)) is None


def test_top_k_components_keeps_the_k_largest_in_3d():
    volume = np.zeros((10, 10, 10), bool)
    volume[0:3, 0:3, 0:3] = True  # 27 voxels
    volume[6:8, 6:8, 6:8] = True  # 8
    volume[5, 0, 9] = True  # 1
    volume[3, 3, 3] = True  # touches the 27-block only at a corner: its own component with face connectivity
    assert keep_largest_components(volume, 1).sum() == 27
    two = keep_largest_components(volume, 2)
    assert two.sum() == 35 and two[7, 7, 7] and not two[5, 0, 9]
    assert keep_largest_components(volume, 1, connectivity=3).sum() == 28  # corner-connected at full connectivity
    assert keep_largest_components(volume, 10).sum() == volume.sum()


def test_component_choice_is_anchored_on_the_annotated_slices():
    coarse = np.zeros((10, 8, 8), bool)
    coarse[0:6, :, :] = True  # a large false blob (e.g. empty slices at the top of the head)
    coarse[7:10, 2:4, 2:4] = True  # the structure, smaller
    annotated = {8: np.zeros((8, 8), bool)}
    annotated[8][2:4, 2:4] = True
    assert select_components(coarse, 1)[0].any()  # the paper's rule alone keeps the large blob
    anchored = select_components(coarse, 1, annotated)
    assert not anchored[:6].any() and anchored[7:10, 2:4, 2:4].all()


def test_a_slice_stack_goes_back_to_voxel_order_for_every_axis():
    volume = np.random.default_rng(0).integers(0, 2, size=(1, 5, 6, 7)).astype(np.uint8)
    for axis in range(3):
        stack = np.stack([extract_slice(volume, axis, k)[0].numpy() for k in range(volume.shape[axis + 1])])
        assert np.array_equal(stack_to_volume(stack, axis), volume[0])


def test_settings_reject_what_the_paper_does_not_define():
    with pytest.raises(ValueError):
        SAPNetSettings(position_dim=63)
    with pytest.raises(ValueError):
        SAPNetSettings(ce_weight=0, dice_weight=0)
    with pytest.raises(ValueError):
        AutoSegmentSettings(refine="mask")


# -- real data ---------------------------------------------------------------------------------------------------
# Colin27 T1, left thalamus (AAL 77, axial slices 70-91 of 181). Only slices 62-99 are encoded (encoding is the cost:
# ~0.5-1 s a slice here): the structure plus 8 slices without it on each side, where the pipeline must stay empty.
# The rest of the volume is outside the segmented range, so it is empty in the result and in the label alike.
RANGE = (62, 100)


@pytest.fixture(scope="module")
def thalamus_volume():
    model = build_litemedsam().eval()
    image = load_image(os.path.join(DATA, "colin27_t1.nii.gz"))
    label = load_image(os.path.join(DATA, "labels", "final", "colin27_t1.nii.gz")).array[0].numpy().round() == 77
    intensity = compute_intensity_range(image.array.numpy(), "MR")
    slice_of = lambda k: apply_intensity_range(extract_slice(image.array[:1], 2, k), intensity)
    truth = np.stack([extract_slice(label[None], 2, k)[0].numpy() for k in range(label.shape[2])])  # (K, rows, cols)
    # The infer task's own whole-slice embeddings and cache: what it will hand to auto_segment.
    predictor = PromptPredictor(model, torch.device("cpu"), LRUCache(RANGE[1] - RANGE[0]), ObjectMemory())
    embed = lambda k: predictor.embed(slice_of(k), Window.whole(truth.shape[1:]), EmbeddingKey("colin27", "axial", 2, k))[0]
    start = time.perf_counter()
    for k in range(*RANGE):
        embed(k)
    encode_seconds = time.perf_counter() - start
    train = select_training_slices(label, 2, 2, np.random.default_rng(0))
    learner = SAPNetLearner(model, torch.device("cpu"))
    for k in train:
        learner.add_slice(slice_of(k), truth[k], index=k, embedding=embed(k))
    learned = learner.train()
    print(f"encoded {RANGE[1] - RANGE[0]} slices in {encode_seconds:.1f} s; SAP-Net learned from {train} "
          f"in {learned.seconds:.1f} s")
    return dict(model=model, truth=truth, embed=embed, train=train, learned=learned)


def copy_nearest_annotation(truth: np.ndarray, train: list[int]) -> np.ndarray:
    """The trivial baseline: every slice of the volume gets the mask of the nearest annotated slice."""
    return np.stack([truth[min(train, key=lambda t: abs(t - k))] for k in range(len(truth))])


def test_a_learned_sapnet_reloads_from_its_state_dict_and_json(thalamus_volume, tmp_path):
    c = thalamus_volume
    learned = c["learned"]
    assert learned.losses[-1] < 0.3 * learned.losses[0] and learned.slices == c["train"]
    torch.save(learned.state_dict, tmp_path / "sapnet.pt")
    (tmp_path / "sapnet.json").write_text(json.dumps(learned.info()))
    net = load_sapnet(torch.load(tmp_path / "sapnet.pt", weights_only=True),
                      json.loads((tmp_path / "sapnet.json").read_text()))
    embedding = c["embed"](c["train"][0])
    again = load_sapnet(learned.state_dict, learned.settings)
    with torch.inference_mode():
        assert torch.allclose(net.predict(embedding), again.predict(embedding))
    size = sum(v.numel() for v in learned.state_dict.values())
    assert size < 100_000  # a few hundred KB: cheap to store per label


def test_samauto_segments_the_thalamus_from_two_annotated_slices(thalamus_volume):
    c = thalamus_volume
    model, truth, train = c["model"], c["truth"], c["train"]
    net = load_sapnet(c["learned"].state_dict, c["learned"].info())
    annotated = {k: truth[k] for k in train}
    calls = []
    start = time.perf_counter()
    result = auto_segment(model, net, c["embed"], len(truth), truth.shape[1:], slice_range=RANGE, annotated=annotated,
                          progress=lambda done, total: calls.append((done, total)))
    seconds = time.perf_counter() - start
    final, coarse = result.labels > 0, result.coarse
    baseline = dice(copy_nearest_annotation(truth, train), truth)
    scores = {"baseline": baseline, "coarse": dice(coarse, truth), "samauto": dice(final, truth)}
    print({k: round(v, 3) for k, v in scores.items()}, f"pipeline {seconds:.1f} s for {RANGE[1] - RANGE[0]} slices")
    # Measured (2 annotated slices, 80 and 81): baseline 0.178, coarse 0.80, SAMauto 0.81. The margin asked is half
    # the measured gain (0.48): about what a perfect mask on only the 3 slices either side of the annotated ones
    # would score (2 * 2700 / (2700 + 8700) voxels), i.e. the structure must be found well beyond them.
    assert scores["samauto"] >= baseline + 0.3
    assert scores["samauto"] >= scores["coarse"] - 0.03  # SAM's refinement must not undo the coarse mask
    # False positives stay next to the structure. Measured: the mask leaks into the 5 slices below the thalamus
    # (65-69, where the atlas's boundary has no edge in the T1 image), 14% of the predicted voxels; slices further
    # away stay empty.
    labelled = [k for k in range(len(truth)) if truth[k].any()]
    empty = [k for k in range(*RANGE) if not truth[k].any()]
    far = [k for k in empty if k < labelled[0] - 5 or k > labelled[-1] + 5]
    assert len(far) >= 5 and not final[far].any()
    assert final[empty].sum() < 0.2 * final.sum()
    assert not final[: RANGE[0]].any() and not final[RANGE[1]:].any()
    assert calls[-1][0] == calls[-1][1] and calls[0] == (1, RANGE[1] - RANGE[0])
    assert all(np.array_equal(final[k], truth[k]) for k in train)  # annotations are kept as they are
    info = {s["slice"]: s for s in result.slices}
    assert set(info) <= set(range(*RANGE)) and all("box_rc" in info[k] for k in info if k not in train)
