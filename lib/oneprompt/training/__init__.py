"""Training and evaluation of the One-Prompt model (Wu et al., CVPR 2024; supplement sections 1.2, 1.3, 3.1 and 4)
on the multi-task 2D data that `lib.oneprompt.dataset` builds (data/oneprompt/: shards + manifest.json). The
slices reach the encoder through `lib.oneprompt.preprocessing`, as served slices do.

One job per module:
- `samples`: the built data read back (`SampleStore`), task roles and modalities from the manifest;
- `augmentation`: the supplement's eight augmentations, on an image and its masks together;
- `features`: the frozen encoder's features per (image, view), cached on disk (`FeatureCache`);
- `simulated_prompts`: oracle clicks, boxes and doodles with the supplement's jitter levels (`make_prompt`);
- `sampling`: what training draws (`TaskSampler`: task, then modality, then sample) and their features
  (`PairSource`);
- `loop`: the training jobs (`train_decoder`, `train_seglab_on_store`), their settings (`TrainConfig`), loss,
  schedule and checkpoints;
- `evaluation`: held-out Dice per prompt kind against the LiteMedSAM and prototype baselines (`evaluate`).
The names below are the package's public interface (scripts/train_oneprompt.py, benchmarks/bench_oneprompt.py).
"""

from lib.oneprompt.preprocessing import to_unit
from lib.oneprompt.training.augmentation import augment, augment_transforms
from lib.oneprompt.training.evaluation import (calibrate_prototype_threshold, evaluate, litemedsam_prediction,
                                               markdown_table, prototype_similarity)
from lib.oneprompt.training.features import FEATURE_NAMES, FeatureCache, stack_features
from lib.oneprompt.training.loop import (TrainConfig, atomic_save, lr_factor, presence_loss, segmentation_loss,
                                         train_decoder, train_seglab_on_store, trainable_state)
from lib.oneprompt.training.samples import AbsentQuery, SampleStore, StoredSample
from lib.oneprompt.training.sampling import PairSource, TaskSampler
from lib.oneprompt.training.simulated_prompts import (DOODLE_LEVELS, JITTER_LEVELS, jitter_points, make_prompt,
                                                      oracle_box, oracle_click, simulate_box, simulate_click,
                                                      simulate_doodle)

__all__ = [
    "DOODLE_LEVELS", "FEATURE_NAMES", "JITTER_LEVELS", "AbsentQuery", "FeatureCache", "PairSource", "SampleStore",
    "StoredSample", "TaskSampler", "TrainConfig", "atomic_save", "augment", "augment_transforms",
    "calibrate_prototype_threshold", "evaluate", "jitter_points", "litemedsam_prediction", "lr_factor", "make_prompt",
    "markdown_table", "oracle_box", "oracle_click", "presence_loss", "prototype_similarity", "segmentation_loss",
    "simulate_box", "simulate_click", "simulate_doodle", "stack_features", "to_unit", "train_decoder",
    "train_seglab_on_store", "trainable_state",
]
