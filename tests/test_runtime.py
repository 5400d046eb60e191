"""Encoder runtimes (lib/core/runtime.py): which one `auto` takes, that an OpenVINO graph is exported once and then
read from its cache, that a damaged cache is rebuilt, and that the masks they give score the same Dice against
ground truth as eager PyTorch on real targets."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from lib.core.backbone import Backbone, SamEncoding
from lib.core.cache import EmbeddingKey, LRUCache
from lib.core.evaluation import evaluate_prompts, load_slice_targets
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor
from lib.core.runtime import FrozenForward, resolve_runtime
from lib.models.sam import build_litemedsam
from tests.helpers import RUNTIME_CACHE, SAMPLE_DATA

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_litemedsam().eval()


def test_auto_is_openvino_bf16_on_cpu_and_eager_on_cuda():
    assert resolve_runtime("auto", torch.device("cpu")) == "openvino_bf16"
    assert resolve_runtime("", torch.device("cpu")) == "openvino_bf16"
    assert resolve_runtime("eager", torch.device("cpu")) == "eager"
    # OpenVINO is for CPUs: on CUDA every setting runs eager PyTorch there.
    assert resolve_runtime("auto", torch.device("cuda")) == "eager"
    assert resolve_runtime("openvino_bf16", torch.device("cuda")) == "eager"
    with pytest.raises(ValueError, match="encoder_runtime"):
        resolve_runtime("tensorrt", torch.device("cpu"))


def test_graph_exported_once_then_read_from_the_cache(model, tmp_path):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = model.encode(x)
    first = FrozenForward(SamEncoding(model), "openvino_fp32", str(tmp_path), name="first")
    out = first(x)
    assert first.export_seconds, "the first use exports the graph"
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["bin", "json", "xml"]
    assert not any(f.startswith(".export-") for f in files), "no temporary folder left behind"
    # fp32: the same embedding as eager, to float rounding.
    assert float((out - eager).abs().max()) < 1e-3

    second = FrozenForward(SamEncoding(model), "openvino_bf16", str(tmp_path), name="second")
    again = second(x)
    assert not second.export_seconds, "a second start reads the cached graph (bf16 is a compile-time choice)"
    assert sorted(os.listdir(tmp_path)) == files
    # bf16 differs from fp32 by rounding, not by anything structural.
    assert float((again - eager).abs().max()) < 0.2
    assert float(torch.nn.functional.cosine_similarity(again.flatten(), eager.flatten(), dim=0)) > 0.999


def test_other_weights_get_another_graph(model, tmp_path):
    for name in os.listdir(RUNTIME_CACHE) if os.path.isdir(RUNTIME_CACHE) else []:
        if name.startswith("SamEncoding-"):  # the default weights' graph, when another test or server built it
            shutil.copy(os.path.join(RUNTIME_CACHE, name), tmp_path)
    FrozenForward(SamEncoding(model), "openvino_fp32", str(tmp_path))(torch.zeros(1, 3, 256, 256))
    other = build_litemedsam().eval()
    with torch.no_grad():
        other.image_encoder.neck[0].weight.mul_(0.5)
    changed = FrozenForward(SamEncoding(other), "openvino_fp32", str(tmp_path))
    changed(torch.zeros(1, 3, 256, 256))
    assert changed.export_seconds, "changed weights must not reuse the old graph"
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".xml")]) == 2


def test_damaged_cache_is_exported_again(model, tmp_path):
    x = torch.rand(1, 3, 256, 256)
    FrozenForward(SamEncoding(model), "openvino_fp32", RUNTIME_CACHE)(x)
    for name in os.listdir(RUNTIME_CACHE):
        if name.startswith("SamEncoding-"):
            shutil.copy(os.path.join(RUNTIME_CACHE, name), tmp_path)
    xml = next(f for f in os.listdir(tmp_path) if f.endswith(".xml"))
    with open(tmp_path / xml, "w") as f:
        f.write("<not a graph")
    rebuilt = FrozenForward(SamEncoding(model), "openvino_fp32", str(tmp_path))
    with torch.inference_mode():
        assert float((rebuilt(x) - model.encode(x)).abs().max()) < 1e-3
    assert rebuilt.export_seconds


def test_a_module_that_cannot_be_exported_runs_eager(tmp_path):
    class DataDependent(torch.nn.Module):  # a Python branch on values: torch.export refuses it
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.scale if float(x.sum()) > 0 else -x

    forward = FrozenForward(DataDependent(), "openvino_bf16", str(tmp_path))
    x = torch.ones(1, 3, 4, 4)
    with torch.inference_mode():
        assert torch.equal(forward(x), x)
    assert forward.info()["eager_fallback"] == [[1, 3, 4, 4]] and forward.info()["graphs"] == []


def test_dict_outputs_keep_their_names(model):
    """One-Prompt's encoder gives a dict of feature maps: the graph's outputs come back under the same keys."""
    from lib.oneprompt.model.model import TinyViTFeatures

    features = TinyViTFeatures(model.image_encoder).eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        eager = features(x)
        out = FrozenForward(features, "openvino_fp32", RUNTIME_CACHE)(x)
    assert list(out) == list(eager)
    for key in eager:
        assert out[key].shape == eager[key].shape
        assert float((out[key] - eager[key]).abs().max()) < 1e-3


def test_backbone_serves_through_its_runtime():
    backbone = Backbone(lambda device: build_litemedsam(device=device), device="cpu",
                        encoder_runtime="openvino_bf16", runtime_cache_dir=RUNTIME_CACHE)
    assert backbone.runtime_info() == {"runtime": "openvino_bf16", "graphs": [], "eager_fallback": []}
    predictor = backbone.predictor(PredictorSettings())
    slice_image = torch.rand(1, 120, 140)
    predictor.embed(slice_image, predictor._window_for((10, 10, 100, 120), (120, 140)), EmbeddingKey("x"))
    assert backbone.runtime_info()["graphs"] == [[1, 3, 256, 256]]


def test_bf16_openvino_scores_the_same_dice_as_eager(model):
    """Real targets (AAL deep grey matter on Colin27, the head CT's intracranial region): box and click Dice against
    ground truth within 0.01 of eager PyTorch, per prompt kind."""
    targets = [
        (os.path.join(SAMPLE_DATA, "colin27_t1.nii.gz"), os.path.join(SAMPLE_DATA, "labels/final/colin27_t1.nii.gz"),
         "MR", 2, 80, dict(values=[71, 72, 73, 74, 77, 78], min_area=30)),
        (os.path.join(SAMPLE_DATA, "head_ct.nii.gz"), os.path.join(SAMPLE_DATA, "labels/final/head_ct.nii.gz"),
         "CT", 2, 20, dict(values=[2])),
    ]
    means = {}
    for runtime in ("eager", "openvino_bf16"):
        encode = FrozenForward(SamEncoding(model), runtime, RUNTIME_CACHE)
        embeddings, objects = LRUCache(64), ObjectMemory()
        predictor_for = lambda zoom: PromptPredictor(model, torch.device("cpu"), embeddings, objects,
                                                     PredictorSettings(zoom=zoom), encode=encode)
        rows = []
        for image, label, modality, axis, index, kwargs in targets:
            slice_image, found = load_slice_targets(image, label, modality, axis, index, **kwargs)
            rows += evaluate_prompts(predictor_for, slice_image, found, axis, index,
                                     EmbeddingKey(image, axis=axis, index=index))
        means[runtime] = {k: float(np.mean([r[k] for r in rows])) for k in ("box_zoom", "box_whole_slice", "click")}
    assert len(rows) >= 5
    assert means["eager"]["box_zoom"] > 0.7, means  # the targets are real ones the model segments
    for kind in means["eager"]:
        assert means["openvino_bf16"][kind] >= means["eager"][kind] - 0.01, (kind, means)
