"""TP-DRSeg (Li et al., MICCAI 2024): lesion descriptions, frozen text encoders (MiniLM offline default, CLIP from
local weights), the explicit prior map, and the model (explicit prior encoder, prior-aligned injectors,
class-specific prompt generator, SAM decoder: `model.py`). Nothing here imports torchvision, timm, open_clip or sentence-transformers."""

from lib.tpdrseg.model.descriptions import DEFAULT_LESIONS_FILE, LesionCatalogue, LesionClass, normalise
from lib.tpdrseg.model.text_encoder import CLIPTextEncoder, MiniLMTextEncoder, build_text_encoder
from lib.tpdrseg.model.prior_encoder import ExplicitPriorEncoder, minmax_maps, similarity_maps
from lib.tpdrseg.model.injector import PriorAlignedInjector
from lib.tpdrseg.model.prompt_generator import ClassPromptGenerator
from lib.tpdrseg.model.model import TPDRSeg, build_tpdrseg
from lib.tpdrseg.model.prior import explicit_prior

__all__ = ["DEFAULT_LESIONS_FILE", "LesionCatalogue", "LesionClass", "normalise", "explicit_prior",
           "CLIPTextEncoder", "MiniLMTextEncoder", "build_text_encoder", "ExplicitPriorEncoder", "minmax_maps",
           "similarity_maps", "PriorAlignedInjector", "ClassPromptGenerator", "TPDRSeg", "build_tpdrseg"]
