"""One-Prompt (paper 003): one prompted template image segments query images of an unseen task. Our own
implementation from the paper and its supplement: prompt encoder (click, box, doodle, SegLab), SegLab discrete
autoencoder, Prompt-Parser, One-Prompt Former decoder on a frozen LiteMedSAM TinyViT encoder."""

from .former import OnePromptFormerBlock
from .model import (DEFAULT_HEAD_SKIPS, DEFAULT_LEVELS, OnePromptModel, TinyViTFeatures, build_oneprompt,
                    masked_prototype)
from .prompt_encoder import Prompt, PromptEncoder, scribble_points
from .prompt_parser import PromptParser
from .seglab import SegLabAutoencoder, train_seglab

__all__ = [
    "DEFAULT_HEAD_SKIPS", "DEFAULT_LEVELS", "OnePromptFormerBlock", "OnePromptModel", "Prompt", "PromptEncoder",
    "PromptParser", "SegLabAutoencoder", "TinyViTFeatures", "build_oneprompt", "masked_prototype", "scribble_points",
    "train_seglab",
]
