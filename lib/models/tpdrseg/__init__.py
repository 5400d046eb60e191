"""TP-DRSeg groundwork (issue 6): lesion descriptions, frozen text encoders (MiniLM offline default, CLIP from local
weights), and the explicit prior map. Nothing here imports torchvision, timm, open_clip or sentence-transformers."""

from .descriptions import DEFAULT_LESIONS_FILE, LesionCatalogue, LesionClass, normalise
from .prior import explicit_prior
from .text_encoder import CLIPTextEncoder, MiniLMTextEncoder, build_text_encoder

__all__ = ["DEFAULT_LESIONS_FILE", "LesionCatalogue", "LesionClass", "normalise", "explicit_prior",
           "CLIPTextEncoder", "MiniLMTextEncoder", "build_text_encoder"]
