"""Segment Anything family models, our own implementation (keys compatible with Meta's and LiteMedSAM's
checkpoints): image encoders (ViT, TinyViT), prompt encoder, two-way transformer, mask decoder, `Sam`."""

from lib.models.sam.build import (
    LITEMEDSAM_SHA256,
    CheckpointError,
    build_litemedsam,
    build_sam_vit,
    download_checkpoint,
    litemedsam_checkpoint_path,
    load_checkpoint_state,
    make_litemedsam,
    make_sam_vit,
    resolve_checkpoint,
    sha256_of,
)
from lib.models.sam.image_encoder_tinyvit import TinyViTImageEncoder
from lib.models.sam.image_encoder_vit import VIT_CONFIGS, ImageEncoderViT
from lib.models.sam.mask_decoder import MaskDecoder
from lib.models.sam.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from lib.models.sam.sam import Sam
from lib.models.sam.transformer import TwoWayTransformer

__all__ = [
    "LITEMEDSAM_SHA256", "VIT_CONFIGS", "CheckpointError", "ImageEncoderViT", "MaskDecoder",
    "PositionEmbeddingRandom", "PromptEncoder", "Sam", "TinyViTImageEncoder", "TwoWayTransformer",
    "build_litemedsam", "build_sam_vit", "download_checkpoint", "litemedsam_checkpoint_path",
    "load_checkpoint_state", "make_litemedsam", "make_sam_vit", "resolve_checkpoint", "sha256_of",
]
