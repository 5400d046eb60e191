"""A user-provided Meta SAM checkpoint (`--conf sam_checkpoint PATH`) becomes model `sam_vit_b` of the app and
serves requests through the same infer path (1024x1024 input, Meta's mean/std). No Meta weights exist offline:
a randomly initialised ViT-B is saved in Meta's key layout, so the mask is meaningless; shapes and wiring are not."""

import os

import numpy as np
import pytest
import torch

from helpers import REPO, read_label
from lib.configs.sam import SAMConfig
from lib.models.sam import make_sam_vit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("meta") / "sam_vit_b_random.pth"
    torch.save(make_sam_vit("vit_b").state_dict(), path)
    return str(path)


def test_meta_sam_checkpoint_is_served_as_its_own_model(checkpoint, tmp_path):
    config = SAMConfig()
    config.init("sam_vit_b", str(tmp_path), {"sam_checkpoint": checkpoint, "device": "cpu"})
    task = config.infer()["sam_vit_b"]
    label_file, result = task({"image": os.path.join(REPO, "sample-data", "nuclei.png"), "roi": [200, 260, 200, 260]})
    label = read_label(label_file)
    os.remove(label_file)
    assert label.shape == (512, 512) and set(np.unique(label)) <= {0, 1}
    assert task.model.image_size == 1024 and result["cache"]["encoder_runs"] == 1


def test_missing_checkpoint_says_what_to_do(tmp_path):
    config = SAMConfig()
    config.init("sam_vit_b", str(tmp_path), {"sam_checkpoint": str(tmp_path / "nope.pth")})
    task = config.infer()["sam_vit_b"]
    with pytest.raises(Exception) as e:
        task.model
    assert "nope.pth" in str(e.value)
