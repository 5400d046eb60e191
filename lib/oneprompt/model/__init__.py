"""One-Prompt (Wu et al., CVPR 2024): one prompted template image segments query images of an unseen task. Our own
implementation from the paper and its supplement: prompt encoder (click, box, doodle, SegLab), SegLab discrete
autoencoder, Prompt-Parser, One-Prompt Former decoder on a frozen LiteMedSAM TinyViT encoder."""

from lib.oneprompt.model.former import OnePromptFormerBlock
from lib.oneprompt.model.model import (DEFAULT_HEAD_SKIPS, DEFAULT_LEVELS, OnePromptModel, TinyViTFeatures,
                                       build_oneprompt, masked_prototype)
from lib.oneprompt.model.prompt_encoder import Prompt, PromptEncoder, scribble_points
from lib.oneprompt.model.prompt_parser import PromptParser
from lib.oneprompt.model.seglab import SegLabAutoencoder, train_seglab

__all__ = [
    "DEFAULT_HEAD_SKIPS", "DEFAULT_LEVELS", "OnePromptFormerBlock", "OnePromptModel", "Prompt", "PromptEncoder",
    "PromptParser", "SegLabAutoencoder", "TinyViTFeatures", "build_oneprompt", "masked_prototype", "scribble_points",
    "train_seglab",
]
