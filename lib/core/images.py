"""Reading images and writing label volumes in the image's own geometry.

Images are read with MONAI's LoadImage (NIfTI, NRRD, DICOM series directories, PNG/JPEG/TIFF) as channel-first
arrays in the file's voxel order with a RAS affine. Labels are written with nibabel/pynrrd/Pillow directly: the
result of a click is a whole label volume, and writing it must cost milliseconds, not the ~0.3 s of a generic
ITK writer.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage
from PIL import Image

from lib.core.cache import LRUCache
from lib.core.errors import bad_request, not_found, unreadable
from lib.core.transforms.geometry import extract_slice
from lib.core.transforms.intensity import IntensityRange, apply_intensity_range, compute_intensity_range, parse_ct_window, resolve_modality

# Level 1: a mostly-empty label volume compresses nearly as well as at level 9 and several times faster.
nib.openers.Opener.default_compresslevel = 1

IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Lossless formats only: a JPEG label would not hold its values.
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".png", ".tif", ".tiff")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")
RESULT_DTYPES_2D = ("uint8", "uint16")


@dataclass
class LoadedImage:
    """One image as the models see it. `array` is channel-first: (C, I, J, K) for volumes, (C, X, Y) for 2D."""

    path: str
    fingerprint: tuple
    array: torch.Tensor
    affine: np.ndarray
    meta: dict
    # Per-volume intensity ranges, keyed by (modality, CT window): computed once, reused by every click.
    intensity_ranges: dict = field(default_factory=dict)
    # The modality read from metadata or guessed from the values, when a request does not name one.
    default_modality: str | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def is_2d(self) -> bool:
        return self.array.ndim == 3

    @property
    def is_rgb(self) -> bool:
        return self.is_2d and self.array.shape[0] in (3, 4)

    def intensity(self, modality: str | None = None, ct_window=None) -> tuple[tuple, IntensityRange]:
        """((modality, CT window), intensity range) that slices of this image are normalised with: the named
        modality (validated), else the one its metadata gives or its values suggest. Computed once per image and
        key; the same for a click and for training. Raises ValueError on an unknown modality or window."""
        if modality is None:
            if self.default_modality is None:  # guessing looks at the whole volume's values: once per image
                self.default_modality = resolve_modality(None, self.meta, self.array.numpy(), self.is_rgb)
            modality = self.default_modality
        modality = resolve_modality(modality, None, self.array, self.is_rgb)
        key = (modality, parse_ct_window(ct_window or None) if modality == "CT" else None)
        if key not in self.intensity_ranges:
            self.intensity_ranges[key] = compute_intensity_range(self.array.numpy(), *key)
        return key, self.intensity_ranges[key]

    def normalised_slice(self, axis: int | None, index: int, intensity: IntensityRange) -> torch.Tensor:
        """A (C, rows, cols) slice in [0, 1]. RGB(A) photographs keep their colour; anything else (incl. 4D
        series) is read from its first channel."""
        channels = self.array[:3] if self.is_rgb else self.array[:1]
        return apply_intensity_range(extract_slice(channels, axis, index), intensity, "unit")


def image_kind(modality: str, image: LoadedImage) -> str:
    """What a model answering "this kind of image" needs to know: the modality and whether it is a volume
    ("MR/3D"); a grey-level 2D image (a microscopy PNG) is normalised like MR but is not an MR scan."""
    return f"{modality}/{'2D' if image.is_2d else '3D'}"


def fingerprint(path: str) -> tuple:
    """What identifies the current content of an image file or DICOM directory: a change invalidates caches."""
    path = os.path.realpath(path)
    if not os.path.exists(path):
        raise not_found(f"image not found: {path}")
    if os.path.isdir(path):
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        stamp = tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.is_file())
        return (path, hash(stamp))
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


def load_image(path: str) -> LoadedImage:
    key = fingerprint(path)
    try:
        loaded = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(key[0])
    except Exception as e:  # MONAI raises a zoo of reader errors; to the user they all mean "cannot read it"
        raise unreadable(f"cannot read image {os.path.basename(path)}: {type(e).__name__}: {e}") from e
    array = torch.as_tensor(loaded).float().contiguous()
    if array.ndim == 4 and array.shape[-1] == 1 and key[0].lower().endswith(IMAGE_2D_EXTENSIONS):
        array = array[..., 0]
    if array.ndim not in (3, 4) or min(array.shape[1:]) < 1:
        raise unreadable(f"image {os.path.basename(path)} has unsupported shape {tuple(array.shape)}")
    if not torch.isfinite(array).all():
        array = torch.nan_to_num(array)
    meta = dict(getattr(loaded, "meta", {}))
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    return LoadedImage(path=key[0], fingerprint=key, array=array, affine=affine, meta=meta)


class ImageCache:
    """Loaded images, least recently used dropped, each loaded once however many requests race for it. A file
    that changed on disk is loaded again, and `on_change` listeners (the embedding caches) are told its new
    fingerprint so that they drop what they computed from the old content."""

    def __init__(self, max_items: int = 4, max_bytes: int | None = None):
        self.images = LRUCache(max_items, max_bytes)
        self.on_change: list = []

    def get(self, path: str) -> tuple[LoadedImage, bool]:
        """(the image, whether it was cached)."""
        key = fingerprint(path)
        if self.images.discard_where(lambda k: k[0] == key[0] and k != key):
            for listener in self.on_change:
                listener(key)
        return self.images.get_or_compute(key, lambda: load_image(key[0]))

    def clear(self) -> None:
        self.images.clear()


def default_extension(image: LoadedImage) -> str:
    return ".png" if image.is_2d else ".nii.gz"


def write_label(label: np.ndarray, image: LoadedImage, extension: str | None = None, dtype: str | None = None) -> str:
    """Write `label` (the image's spatial shape, voxel order) next to nothing: a temp file the caller owns."""
    extension = str(extension or default_extension(image)).lower()
    if not extension.startswith("."):
        extension = "." + extension
    if extension not in RESULT_EXTENSIONS:  # checked before any file is made: the suffix becomes part of its path
        raise bad_request(f"unsupported result_extension {extension!r}; use {', '.join(RESULT_EXTENSIONS)}")
    dtype = str(dtype or "uint8").lower()
    allowed = RESULT_DTYPES_2D if extension in IMAGE_2D_EXTENSIONS else RESULT_DTYPES
    if dtype not in allowed:  # labels are integers; PNG holds 8 or 16 bits
        raise bad_request(f"'result_dtype' {dtype!r} is not one of {', '.join(allowed)} for {extension} labels")
    target = np.dtype(dtype)
    label = np.asarray(label)
    if (label.dtype.kind in "iu" and target.kind in "iu" and label.dtype.itemsize > target.itemsize
            and label.size and int(label.max()) > np.iinfo(target).max):
        raise bad_request(f"label value {int(label.max())} does not fit 'result_dtype' {target.name}: "
                          f"ask for result_dtype uint16")
    label = label.astype(target, copy=False)
    if label.shape != image.spatial_shape:
        raise ValueError(f"label shape {label.shape} does not match image {image.spatial_shape}")
    fd, path = tempfile.mkstemp(suffix=extension, prefix="label_")
    os.close(fd)
    if extension in (".nii", ".nii.gz"):
        img = nib.Nifti1Image(label, image.affine)
        img.set_qform(image.affine, code=1)
        img.set_sform(image.affine, code=1)
        nib.save(img, path)
    elif extension == ".nrrd":
        import nrrd

        lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :4]  # NRRD speaks LPS, our affines are RAS
        ndim = label.ndim
        header = {"type": label.dtype.name, "encoding": "gzip", "space": "left-posterior-superior",
                  "space directions": lps[:ndim, :ndim].T if ndim == 3 else None,
                  "space origin": lps[:ndim, 3] if ndim == 3 else None, "kinds": ["domain"] * ndim}
        nrrd.write(path, label, {k: v for k, v in header.items() if v is not None}, compression_level=1)
    else:  # a 2D image format (RESULT_EXTENSIONS)
        if label.ndim != 2:
            raise bad_request(f"a {extension} label must be 2D; this image's is {list(label.shape)}: "
                              f"use .nii.gz or .nrrd")
        Image.fromarray(np.ascontiguousarray(label.T)).save(path)  # (X, Y) -> rows = Y
    return path
