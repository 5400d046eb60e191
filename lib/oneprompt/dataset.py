"""Multi-task 2D training data for a One-Prompt model: a task catalogue, a builder and the shard format.

A *task* is one target structure of one data set, seen on one kind of 2D image (one slicing plane of a volume, or the
2D image itself): `<dataset>/<structure>/<plane>`, e.g. `colin27_aal/Putamen_L/axial`. Its modality is that of its
data set. The model learns from pairs of samples of the same task (a prompted template and a query).

Preprocessing follows the One-Prompt supplement (Wu et al., CVPR 2024), section 1.2 (quoted where it decides
something); the steps that served slices repeat (crop, slicing axes, resize, [0, 1] scaling) are defined once in
`lib.oneprompt.preprocessing`:

* Intensities are normalised per *volume* (or 2D image), by the rules of its modality, with the project's own
  `lib.core.transforms.intensity` (the same clip range and statistics the app computes at inference, z-scored):
  CT: a Hounsfield window (level, width; soft-tissue 40/400 by default) then (x - mean) / std of the windowed volume;
  MR (and the percentile modalities): clip to the 0.5th-99.5th percentiles, statistics inside the non-zero region when
  it is at most 75% of the volume ("normalization is confined to this mask"), then z-score; RGB: z-score of 0-255.
* "we first crop the provided samples to their non-zero region, then uniformly resize them to 256 x 256 ...
  bi-cubic interpolation for images and nearest-neighbor interpolation for masks": the volume (or image) is cropped
  to the bounding box of its non-zero voxels (MONAI `CropForegroundd`, `x != 0`, so CT air at -1024 HU is kept), then
  every slice is resized to 256 x 256 (not aspect-preserving, as the text says: "uniformly"). Bicubic with
  anti-aliasing when shrinking (2D images larger than 256), nearest-exact for labels.
* "On 3D images, we generally operate on the two axes with the highest resolution. If all three axes are isotropic,
  the two trailing axes are used for slice extraction. ... no resampling along the out-of-plane axis is required":
  the slice *plane* is spanned by the two highest-resolution axes, so volumes are sliced across their coarsest axis
  (head CT 0.96 x 0.96 x 1.5 mm: axial). "Trailing" is meant in the (z, y, x) array order of ITK/SimpleITK, which the
  text's pipeline (nnU-Net's) uses; in our (i, j, k) voxel order the trailing ITK axes are i and j, so isotropic
  volumes are sliced across k (axial for the brains here). The supplement's first paragraph also says "we extract the
  2D mid-slice from the 3D volume along all axes"; `axes="all"` slices across all three axes instead.
* "The channel is replicated threefold": grey-level slices become 3 x 256 x 256 (RGB images keep their colours).
* "Masks with multiple classes are processed to individual masks for each class. Masks with multiple connected
  components were dissected. We keep the original masks in situations where masks have only one component.
  Additionally, we exclude masks where the target area is less than ... 100 pixels in a resized 256 x 256
  resolution": per class, on the resized 256 x 256 mask, 8-connected components; each becomes its own sample when
  there are several; every sample must cover at least 100 pixels. Instance labels (nuclei) are dissected by their
  instance ids (touching nuclei stay apart).

Selection and split (deterministic, seeded): per task, `n_templates` template samples are drawn with a seeded RNG from
the task's larger-than-median candidates (a template should show the structure clearly), then up to
`max_per_task - n_templates` query samples are taken evenly spread over the remaining candidates (sorted by slice),
avoiding the templates' images when possible. Held-out tasks (`task_role`) never reach the training split: their
queries are in the `test` split. A task needs at least `n_templates + 1` candidates; others are reported as dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Container, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, CropForegroundd, LoadImaged, MapTransform
from scipy import ndimage

from lib.core.stores import atomic_write
from lib.core.transforms.geometry import RepeatChannelsd, extract_slice
from lib.core.transforms.intensity import ScaleIntensityByModalityd, compute_intensity_range
from lib.oneprompt.preprocessing import SIZE, nonzero, resize_slices, slicing_axes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_DATA = os.path.join(REPO, "sample-data")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "promptable-sam", "oneprompt")

MIN_AREA = 100  # pixels at 256 x 256 (0.153% of the image)
MAX_PER_TASK = 12  # samples per task (templates included)
N_TEMPLATES = 2
SEED = 0
SPLITS = ("train", "template", "test")

# ---------------------------------------------------------------------------------------------------------------------
# Registry inputs beyond the committed sample data (fetched by scripts/build_oneprompt_data.py into the cache folder:
# wheels are opened with zipfile, .deb files extracted with dpkg-deb, as scripts/prepare_sample_data.py does).

WHEELS = {"nilearn": "0.14.1"}
DEBS = {"mricron-data": "1.2.20211006+dfsg-4"}
EXTRA_INPUTS = {
    "mni152_t1": ("wheel:nilearn", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
    "mni152_gm": ("wheel:nilearn", "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "mni152_wm": ("wheel:nilearn", "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                  "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
    "inia19_t1": ("deb:mricron-data", "usr/share/mricron/templates/inia19-t1-brain.nii.gz",
                  "3f0707f4999a0c6b56d6c9a0145310cba17753e2b4612f577d8dbfe65a89e231"),
    "inia19_neuromaps": ("deb:mricron-data", "usr/share/mricron/templates/inia19-NeuroMaps.nii.gz",
                         "5e3019d073aedc6cabfeed107b049959fe8398a8ab6b0218d8ac050c311aaf79"),
}


def package_root(cache: str, source: str) -> str:
    """Where the fetch step unpacks a package: <cache>/whl-<name> or <cache>/deb-<name>."""
    kind, name = source.split(":", 1)
    return os.path.join(cache, ("whl-" if kind == "wheel" else "deb-") + name)


def extra_input_path(cache: str, name: str) -> str:
    source, rel, _ = EXTRA_INPUTS[name]
    return os.path.join(package_root(cache, source), rel)


def extra_input_origin(name: str) -> str:
    source, rel, _ = EXTRA_INPUTS[name]
    kind, pkg = source.split(":", 1)
    version = (WHEELS if kind == "wheel" else DEBS)[pkg]
    return f"{'PyPI' if kind == 'wheel' else 'Debian'} {pkg} {version}: {rel}"


# INIA19 NeuroMaps: the package ships the label volume without its name table, so regions are named by value. Left
# hemisphere values are v, right ones v + 1000 (checked on the centroids: v at world x < 0 in the RAS affine). These
# are the 8 largest pairs by voxel count.
INIA19_PAIRS = (55, 193, 2, 54, 1, 147, 196, 58)

# ---------------------------------------------------------------------------------------------------------------------
# Held-out tasks: never trained on.
#
# * AAL structure pairs (both hemispheres on the same side, so the mirror image of a held-out structure is never
#   seen): a deep grey nucleus (putamen; the project's MSA/SAMassist demos use it too, so One-Prompt's unseen-task
#   result can be compared with theirs), a medial temporal (hippocampus), a cortical (insula, precuneus) and a
#   cerebellar structure (lobule 6 and vermis 4-5). Their neighbours (caudate, pallidum, parahippocampal gyrus,
#   cuneus, other lobules) are trained on, so the test asks for a new structure on seen images.
# * Whole data sets: the DSB nuclei (a modality, fluorescence microscopy, that no training task has; a real
#   annotation; a single image, so it would add little training data) and the INIA19 macaque atlas (a new species
#   and atlas on a seen modality). The head CT stays in training: it is the only CT, and its labels are derived by
#   thresholds, which makes them a weak yardstick for evaluation.
HELDOUT_AAL = ("Putamen", "Hippocampus", "Insula", "Precuneus", "Cerebelum_6", "Vermis_4_5")
HELDOUT_DATASETS = ("nuclei_dsb", "inia19_neuromaps")
HELDOUT_RATIONALE = (
    "AAL pairs (both hemispheres together): putamen, hippocampus, insula, precuneus, cerebellum lobule 6, vermis 4-5 - "
    "new structures on seen images, with trained neighbours; putamen is also the project's MSA/SAMassist demo target. "
    "Whole data sets: nuclei_dsb (fluorescence microscopy, a modality no training task has; real annotation; one "
    "image) and inia19_neuromaps (macaque brain: new species and atlas on a seen modality). Head CT stays in "
    "training: only CT source, derived labels are a weak test.")


def structure_family(structure: str) -> str:
    """`Putamen_L` -> `Putamen`: the hemisphere suffix dropped."""
    for suffix in ("_L", "_R"):
        if structure.endswith(suffix):
            return structure[: -len(suffix)]
    return structure


def task_role(dataset: str, structure: str) -> str:
    """"heldout" for the tasks no training step may see, else "train"."""
    if dataset in HELDOUT_DATASETS:
        return "heldout"
    if dataset == "colin27_aal" and structure_family(structure) in HELDOUT_AAL:
        return "heldout"
    return "train"


# ---------------------------------------------------------------------------------------------------------------------
# Catalogue


@dataclass
class DatasetSpec:
    """One labelled source: files, the structures its label values stand for, and how to normalise it."""

    name: str
    modality: str  # what the images are (task metadata): MR, CT, microscopy, fundus
    norm: str  # lib.core.transforms.intensity modality whose rule normalises it: MR, CT, OTHER, RGB
    inputs: dict  # role -> local file: "image" plus "label", or plus the probability maps
    origins: dict  # role -> where the file comes from (repo path or "PyPI/Debian package version: path")
    classes: dict  # label value -> structure name (instance data: {1: name})
    label_kind: str
    licence: str
    instances: bool = False  # label values are instance ids of the one class
    ct_window: str | None = None
    probability_maps: tuple = ()  # roles of probability maps; label = i + 1 where map i > threshold
    probability_scale: float = 1.0  # map value that means probability 1
    threshold: float = 0.5

    @property
    def is_available(self) -> bool:
        return all(os.path.isfile(p) for p in self.inputs.values())


@dataclass(frozen=True)
class Task:
    id: str
    dataset: str
    structure: str
    label_value: int
    modality: str
    plane: str  # axial / coronal / sagittal / 2d
    axis: int | None  # voxel axis the slices are taken across; None for 2D images
    role: str  # train / heldout

    def as_dict(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "structure": self.structure, "label_value": self.label_value,
                "modality": self.modality, "plane": self.plane, "axis": self.axis, "role": self.role}


def dataset_catalogue(sample_dir: str = SAMPLE_DATA, cache_dir: str | None = None,
                      only_available: bool = True) -> list[DatasetSpec]:
    """The data sets, in build order. Sample-data ones always; registry ones when `cache_dir` is given (and, with
    `only_available`, their files are there)."""
    s = lambda *p: os.path.join(sample_dir, *p)  # noqa: E731
    rel = lambda p: os.path.relpath(p, REPO) if os.path.abspath(p).startswith(REPO + os.sep) else p  # noqa: E731
    names_file = s("labels", "colin27_aal_names.json")
    aal = {}
    if os.path.isfile(names_file):
        with open(names_file) as f:
            aal = {int(k): v for k, v in json.load(f).items()}
    specs = [
        DatasetSpec("colin27_aal", "MR", "MR",
                    {"image": s("colin27_t1.nii.gz"), "label": s("labels", "final", "colin27_t1.nii.gz")}, {},
                    aal, "manual atlas (AAL, drawn on this brain; 116 regions)",
                    "BSD-3-Clause (Debian mricron-data); Colin27 (c) MNI / D. L. Collins; "
                    "AAL: cite Tzourio-Mazoyer 2002"),
        DatasetSpec("head_ct", "CT", "CT",
                    {"image": s("head_ct.nii.gz"), "label": s("labels", "final", "head_ct.nii.gz")}, {},
                    {1: "bone", 2: "intracranial_soft_tissue"},
                    "derived (HU thresholds + morphology), not a manual annotation",
                    "GPL-2 (Debian invesalius-examples)", ct_window="soft_tissue"),
        DatasetSpec("nuclei_dsb", "microscopy", "OTHER",
                    {"image": s("nuclei.png"), "label": s("labels", "final", "nuclei.png")}, {},
                    {1: "nucleus"}, "real annotation (2018 Data Science Bowl instance masks)",
                    "CC0 1.0 (BBBC038); package BSD-3-Clause (PyPI stardist)", instances=True),
        DatasetSpec("retina_fov", "fundus", "RGB",
                    {"image": s("retina.png"), "label": s("labels", "final", "retina.png")}, {},
                    {1: "field_of_view"}, "derived (intensity threshold), not a lesion or vessel annotation",
                    "CC0 1.0 (Wikimedia Commons via scikit-image); package BSD-3-Clause"),
    ]
    for spec in specs:
        spec.origins = {role: rel(path) for role, path in spec.inputs.items()}
    if cache_dir:
        specs.append(DatasetSpec(
            "mni152_tissue", "MR", "MR",
            {"image": extra_input_path(cache_dir, "mni152_t1"), "gm": extra_input_path(cache_dir, "mni152_gm"),
             "wm": extra_input_path(cache_dir, "mni152_wm")},
            {"image": extra_input_origin("mni152_t1"), "gm": extra_input_origin("mni152_gm"),
             "wm": extra_input_origin("mni152_wm")},
            {1: "grey_matter", 2: "white_matter"},
            "derived: the template's own tissue probability maps thresholded at 0.5 (grey/white matter)",
            "nilearn BSD-3-Clause; ICBM152 2009a template: nilearn's description says 'License: unknown' "
            "(upstream MNI copyright notice, permissive with attribution: Fonov 2009/2011, Collins 1999)",
            probability_maps=("gm", "wm"), probability_scale=255.0, threshold=0.5))
        neuromaps = {}
        for v in INIA19_PAIRS:
            neuromaps[v], neuromaps[v + 1000] = f"NeuroMaps_{v}_L", f"NeuroMaps_{v}_R"
        specs.append(DatasetSpec(
            "inia19_neuromaps", "MR", "MR",
            {"image": extra_input_path(cache_dir, "inia19_t1"),
             "label": extra_input_path(cache_dir, "inia19_neuromaps")},
            {"image": extra_input_origin("inia19_t1"), "label": extra_input_origin("inia19_neuromaps")},
            dict(sorted(neuromaps.items())),
            "atlas (NeuroMaps parcellation of the INIA19 rhesus macaque template; 8 largest region pairs, "
            "named by value: the package has no name table)",
            "Debian mricron-data copyright: 'Files: *' BSD-3-Clause; INIA19: cite Rohlfing et al. 2012 "
            "(upstream terms not restated in the package)"))
    if only_available:
        specs = [spec for spec in specs if spec.is_available and (spec.classes or spec.instances)]
    return specs


PLANE_OF_AXIS_CODE = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


def plane_name(affine, axis: int | None) -> str:
    if axis is None:
        return "2d"
    import nibabel as nib

    return PLANE_OF_AXIS_CODE[nib.aff2axcodes(np.asarray(affine, dtype=np.float64))[axis]]


def _volume_geometry(path: str) -> tuple[np.ndarray | None, tuple | None]:
    """(affine, spacing) from a NIfTI header without reading voxels; (None, None) for 2D images."""
    if not path.endswith((".nii", ".nii.gz")):
        return None, None
    import nibabel as nib

    img = nib.load(path)
    return img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def task_catalogue(specs: Iterable[DatasetSpec], axes: str = "supplement") -> list[Task]:
    """Every (data set, structure, plane) task the specs can give, before any filtering, in build order."""
    tasks = []
    for spec in specs:
        affine, spacing = _volume_geometry(spec.inputs["image"])
        axis_list = (None,) if affine is None else slicing_axes(spacing, axes)
        for axis in axis_list:
            plane = plane_name(affine, axis)
            for value, structure in spec.classes.items():
                tasks.append(Task(f"{spec.name}/{structure}/{plane}", spec.name, structure, int(value), spec.modality,
                                  plane, axis, task_role(spec.name, structure)))
    return tasks


# ---------------------------------------------------------------------------------------------------------------------
# Transforms (MONAI dictionary transforms; volume level, then per slice)


class ProbabilityMapsToLabeld(MapTransform):
    """Tissue probability maps -> one label map: value i + 1 where map i (divided by `scale`) exceeds `threshold`.
    With maps that sum to at most 1 and threshold >= 0.5 the classes cannot overlap. The maps are dropped."""

    def __init__(self, keys: KeysCollection, label_key: str = "label", threshold: float = 0.5, scale: float = 1.0):
        super().__init__(keys)
        self.label_key, self.threshold, self.scale = label_key, threshold, scale

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        maps = [d.pop(key) for key in self.keys]
        label = maps[0].clone() if isinstance(maps[0], torch.Tensor) else torch.as_tensor(maps[0]).clone()
        label.zero_()
        for i, m in enumerate(maps):
            if tuple(m.shape) != tuple(label.shape):
                raise ValueError(f"probability maps differ in shape: {tuple(m.shape)} vs {tuple(label.shape)}")
            label[torch.as_tensor(m).as_subclass(torch.Tensor) / self.scale > self.threshold] = i + 1
        d[self.label_key] = label
        return d


class SelectLabelsd(MapTransform):
    """Label values not in `values` become 0 (None keeps every value: instance ids)."""

    def __init__(self, keys: KeysCollection, values: Container[int] | None):
        super().__init__(keys)
        self.values = None if values is None else sorted(int(v) for v in values)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.values is None:
            return d
        for key in self.key_iterator(d):
            label = d[key]
            keep = torch.isin(torch.as_tensor(label).round().long(), torch.tensor(self.values))
            d[key] = label * keep
        return d


class IntensityRanged(MapTransform):
    """Store the clip range and z-score statistics of the whole image (before any crop), computed as the app does
    at inference (`lib.core.images.LoadedImage.intensity`), in `data[range_key]` for `ScaleIntensityByModalityd`."""

    def __init__(self, keys: KeysCollection, modality_key: str = "norm", ct_window_key: str = "ct_window",
                 range_key: str = "intensity_range"):
        super().__init__(keys)
        self.modality_key, self.ct_window_key, self.range_key = modality_key, ct_window_key, range_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = torch.as_tensor(d[key]).as_subclass(torch.Tensor).numpy()
            d[self.range_key] = compute_intensity_range(array, d[self.modality_key], d.get(self.ct_window_key))
        return d


class SliceVolumed(MapTransform):
    """Volume dict -> list of slice dicts, `keys` as (C, rows, cols) slices (`extract_slice`, as the app shows them)
    with `axis`, `plane` and `slice_index`; a 2D image gives one dict (axis None, slice_index -1). Slices whose
    `skip_empty_key` array is all zero are left out."""

    def __init__(self, keys: KeysCollection, axes: str = "supplement", skip_empty_key: str | None = "label"):
        super().__init__(keys)
        self.axes, self.skip_empty_key = axes, skip_empty_key

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        first = d[self.keys[0]]
        affine = np.asarray(getattr(first, "affine", np.eye(4)), dtype=np.float64)
        arrays = {key: torch.as_tensor(d[key]).as_subclass(torch.Tensor) for key in self.keys}
        rest = {k: v for k, v in d.items() if k not in self.keys}
        if first.ndim == 3:
            return [{**rest, **{k: extract_slice(a, None, None) for k, a in arrays.items()},
                     "axis": None, "plane": "2d", "slice_index": -1}]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        out = []
        for axis in slicing_axes(spacing, self.axes):
            plane = plane_name(affine, axis)
            occupied = None
            if self.skip_empty_key in arrays:
                in_plane = tuple(a for a in range(3) if a != axis)
                occupied = (arrays[self.skip_empty_key] != 0).any(dim=0).to(torch.uint8).amax(dim=in_plane)
            for index in range(first.shape[axis + 1]):
                if occupied is not None and not bool(occupied[index]):
                    continue
                out.append({**rest, **{k: extract_slice(a, axis, index) for k, a in arrays.items()},
                            "axis": axis, "plane": plane, "slice_index": index})
        return out


@dataclass
class Target:
    """One binary mask on one resized slice: a class, or one component / instance of it."""

    value: int  # class value (instance data: 1)
    instance: int  # instance id, 0 for class labels
    component: int  # rank among the class's components on this slice (0 = largest); 0 when not dissected
    n_components: int  # components (instances) the class has on this slice at 256 x 256, before the area filter
    area: int
    bits: np.ndarray = field(repr=False)  # np.packbits of the (size, size) mask

    def mask(self, size: int) -> np.ndarray:
        return np.unpackbits(self.bits, count=size * size).reshape(size, size)


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def split_targets(label: np.ndarray, values: Iterable[int] | None, min_area: int = MIN_AREA,
                  dissect: bool = True, instances: bool = False) -> list[Target]:
    """The supplement's mask rule on one resized 2D label map: one mask per class, its 8-connected components
    dissected when there are several (instance data: one mask per instance id, each checked the same way), masks
    under `min_area` pixels dropped. `dissect=False` keeps each class whole (instance data: all instances in one
    mask of value 1). Deterministic order: class value, then component rank (area, descending; ties
    by raster order)."""
    label = np.asarray(label).round().astype(np.int64)
    targets = []
    if instances and not dissect:  # the class as a whole: every instance in one mask
        instances, label = False, (label > 0).astype(np.int64)
        values = [1]
    if instances:
        groups = [(1, [(int(i), label == i) for i in np.unique(label) if i > 0])]
    else:
        present = set(np.unique(label).tolist())
        groups = [(int(v), [(0, label == v)]) for v in (sorted(present - {0}) if values is None else values)
                  if int(v) in present and v != 0]
    for value, masks in groups:
        pieces = []  # (area, raster position, instance, mask)
        for instance, mask in masks:
            comps, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
            if n > 1 and (dissect or instances):
                for c in range(1, n + 1):
                    piece = comps == c
                    pieces.append((int(piece.sum()), int(np.flatnonzero(piece)[0]), instance, piece))
            elif n:
                pieces.append((int(mask.sum()), int(np.flatnonzero(mask)[0]), instance, mask))
        if not dissect and not instances:
            n_total = 1
        else:
            n_total = len(pieces)
        pieces.sort(key=lambda p: (-p[0], p[1]))
        for rank, (area, _, instance, piece) in enumerate(pieces):
            if area < min_area:
                continue
            targets.append(Target(value, instance, rank if n_total > 1 else 0, n_total, area,
                                  np.packbits(piece.reshape(-1))))
    return targets


class SplitTargetsd(MapTransform):
    """Slice dict -> the same dict with `data[targets_key]` = `split_targets(label)`; the label is dropped and the
    image made a float32 numpy array."""

    def __init__(self, label_key: str = "label", image_key: str = "image", targets_key: str = "targets",
                 values: Iterable[int] | None = None, min_area: int = MIN_AREA, dissect: bool = True,
                 instances: bool = False):
        super().__init__([label_key])
        self.label_key, self.image_key, self.targets_key = label_key, image_key, targets_key
        self.values = None if values is None else [int(v) for v in values]
        self.min_area, self.dissect, self.instances = min_area, dissect, instances

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = torch.as_tensor(d.pop(self.label_key)).as_subclass(torch.Tensor).numpy()[0]
        d[self.targets_key] = split_targets(label, self.values, self.min_area, self.dissect, self.instances)
        d[self.image_key] = np.ascontiguousarray(
            torch.as_tensor(d[self.image_key]).as_subclass(torch.Tensor).numpy(), dtype=np.float32)
        return d


def volume_transforms(spec: DatasetSpec) -> Compose:
    """Load, build the label, compute the intensity range on the whole image, crop to non-zero, z-score."""
    maps = list(spec.probability_maps)
    t = [LoadImaged(keys=["image", *maps], image_only=True, ensure_channel_first=True, dtype=np.float32)]
    if maps:
        t.append(ProbabilityMapsToLabeld(maps, "label", spec.threshold, spec.probability_scale))
    else:
        t.append(LoadImaged(keys="label", image_only=True, ensure_channel_first=True, dtype=np.float32))
    t += [
        SelectLabelsd("label", None if spec.instances else list(spec.classes)),
        IntensityRanged("image"),
        CropForegroundd(keys=["image", "label"], source_key="image", select_fn=nonzero, margin=0, allow_smaller=True),
        ScaleIntensityByModalityd("image", modality_key="norm", ct_window_key="ct_window",
                                  range_key="intensity_range", output="zscore"),
    ]
    return Compose(t)


def slice_transforms(spec: DatasetSpec, size: int = SIZE, min_area: int = MIN_AREA, dissect: bool = True,
                     axes: str = "supplement", values: Iterable[int] | None = None) -> Compose:
    """Slice, resize to size x size (bicubic image, nearest label) and split the label into filtered targets."""
    return Compose([
        SliceVolumed(["image", "label"], axes=axes, skip_empty_key="label"),
        resize_slices(["image"], size, mask_keys=["label"]),
        SplitTargetsd(values=None if spec.instances else (values if values is not None else list(spec.classes)),
                      min_area=min_area, dissect=dissect, instances=spec.instances),
    ])


# ---------------------------------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Plan:
    """A selected sample: which task, split, image and target (the mask is kept packed)."""

    task: str
    split: str
    image_key: str
    slice_index: int
    axis: int | None
    value: int
    instance: int
    component: int
    n_components: int
    area: int
    bits: np.ndarray = field(repr=False, compare=False, hash=False)


@dataclass
class Sample:
    image: np.ndarray  # (3, size, size) float32, z-scored
    mask: np.ndarray  # (size, size) uint8, 0/1
    task: str
    split: str  # train / template / test
    source: str  # the image file (repo path or registry package: path)
    slice_index: int  # -1 for 2D images
    axis: int | None
    instance: int
    component: int
    n_components: int
    area: int
    image_key: str  # identical for samples cut from the same slice


@dataclass
class DatasetBuild:
    spec: DatasetSpec
    size: int
    tasks: list  # [Task] with at least one selected sample, catalogue order
    plans: list  # [Plan] ordered by task, split, slice, component
    images: dict  # image_key -> (C, size, size) float32 (C = 1 grey, 3 RGB); only those used by plans
    candidates: dict  # task id -> samples that passed the mask filter (before selection)
    dropped: dict  # task id -> why it has no samples
    shape: tuple = ()  # spatial shape after the crop to the non-zero region (voxel order; 2D: (X, Y))
    spacing: tuple | None = None  # voxel spacing in mm (None for 2D images)

    def samples(self, split: str | None = None) -> Iterator[Sample]:
        repeat = RepeatChannelsd("image")
        for p in self.plans:
            if split is not None and p.split != split:
                continue
            image = repeat({"image": torch.from_numpy(self.images[p.image_key])})["image"].numpy()
            yield Sample(image, np.unpackbits(p.bits, count=self.size * self.size).reshape(self.size, self.size),
                         p.task, p.split, self.spec.origins["image"], p.slice_index, p.axis, p.instance, p.component,
                         p.n_components, p.area, p.image_key)

    def counts(self) -> dict:
        out = {t.id: {s: 0 for s in SPLITS} for t in self.tasks}
        for p in self.plans:
            out[p.task][p.split] += 1
        return out

    def shard_arrays(self) -> dict:
        """The arrays of this build's shard (see `save_shard`): images once each, masks bit-packed."""
        keys = sorted({p.image_key for p in self.plans}, key=_image_order)
        index = {k: i for i, k in enumerate(keys)}
        size = self.size
        images = np.stack([self.images[k] for k in keys]) if keys else np.zeros((0, 1, size, size), np.float32)
        bits = np.stack([np.packbits(np.unpackbits(p.bits, count=size * size).reshape(size, size), axis=-1)
                         for p in self.plans]) if self.plans else np.zeros((0, size, size // 8), np.uint8)
        return {
            "images": images.astype(np.float32),
            "image_keys": np.array(keys, dtype=str),
            "masks_bits": bits,
            "sample_image": np.array([index[p.image_key] for p in self.plans], dtype=np.int32),
            "sample_task": np.array([p.task for p in self.plans], dtype=str),
            "sample_split": np.array([p.split for p in self.plans], dtype=str),
            "sample_slice": np.array([p.slice_index for p in self.plans], dtype=np.int32),
            "sample_axis": np.array([-1 if p.axis is None else p.axis for p in self.plans], dtype=np.int8),
            "sample_instance": np.array([p.instance for p in self.plans], dtype=np.int32),
            "sample_component": np.array([p.component for p in self.plans], dtype=np.int16),
            "sample_n_components": np.array([p.n_components for p in self.plans], dtype=np.int16),
            "sample_area": np.array([p.area for p in self.plans], dtype=np.int32),
            "source": np.array(self.spec.origins["image"], dtype=str),
        }


def _image_order(key: str):
    dataset, plane, index = key.rsplit("/", 2)
    return dataset, plane, int(index)


def _task_seed(seed: int, task_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:8], "little")


def select(candidates: Sequence, task_id: str, max_per_task: int = MAX_PER_TASK, n_templates: int = N_TEMPLATES,
           seed: int = SEED) -> tuple[list, list]:
    """(templates, queries) out of a task's candidates (objects with .image_key, .area; in slice order).

    Templates: `n_templates` drawn with a seeded RNG (seed and task id) among the candidates whose area is at least
    the median. Queries: up to `max_per_task - n_templates`, evenly spread over the other candidates that are not on
    a template's image (all other candidates when that leaves none, e.g. one 2D image)."""
    n = len(candidates)
    if n < n_templates + 1:
        return [], []
    chosen = []
    if n_templates:
        rng = np.random.default_rng(_task_seed(seed, task_id))
        areas = np.array([c.area for c in candidates])
        pool = np.flatnonzero(areas >= np.median(areas))
        if len(pool) < n_templates:
            pool = np.argsort(-areas, kind="stable")[:n_templates]
        chosen = sorted(int(i) for i in rng.choice(pool, size=n_templates, replace=False))
    template_images = {candidates[i].image_key for i in chosen}
    rest = [i for i in range(n) if i not in chosen]
    apart = [i for i in rest if candidates[i].image_key not in template_images]
    rest = apart or rest
    k = min(len(rest), max(1, max_per_task - n_templates))
    picks = sorted({rest[int(j)] for j in np.linspace(0, len(rest) - 1, k).round().astype(int)})
    return [candidates[i] for i in chosen], [candidates[i] for i in picks]


def build_dataset(spec: DatasetSpec, size: int = SIZE, min_area: int = MIN_AREA, max_per_task: int = MAX_PER_TASK,
                  n_templates: int = N_TEMPLATES, seed: int = SEED, axes: str = "supplement", dissect: bool = True,
                  structures: Container[str] | None = None) -> DatasetBuild:
    """Every selected sample of one data set (see the module docstring). `structures` restricts the build to those
    structure names (tests, quick looks)."""
    classes = {v: n for v, n in spec.classes.items() if structures is None or n in structures}
    values = list(classes)
    data = volume_transforms(spec)({"image": spec.inputs["image"],
                                    **{role: path for role, path in spec.inputs.items() if role != "image"},
                                    "norm": spec.norm, "ct_window": spec.ct_window})
    shape = tuple(int(s) for s in data["image"].shape[1:])
    spacing = None
    if data["image"].ndim == 4:
        affine = np.asarray(data["image"].affine, dtype=np.float64)
        spacing = tuple(float(round(x, 6)) for x in np.linalg.norm(affine[:3, :3], axis=0))
    if not spec.instances:
        data = SelectLabelsd("label", values)(data)
    slices = slice_transforms(spec, size, min_area, dissect, axes, values)(data)
    if isinstance(slices, dict):
        slices = [slices]

    planes, images, per_task = [], {}, {}
    for s in slices:
        if s["plane"] not in planes:
            planes.append(s["plane"])
        key = f"{spec.name}/{s['plane']}/{s['slice_index']}"
        for t in s["targets"]:
            structure = classes.get(t.value)
            if structure is None:
                continue
            task_id = f"{spec.name}/{structure}/{s['plane']}"
            per_task.setdefault(task_id, []).append(Plan(task_id, "", key, int(s["slice_index"]), s["axis"], t.value,
                                                         t.instance, t.component, t.n_components, t.area, t.bits))
        if s["targets"]:
            images[key] = s["image"]
    axis_of_plane = {s["plane"]: s["axis"] for s in slices}

    tasks, plans, candidates, dropped = [], [], {}, {}
    for plane in planes:
        for value, structure in classes.items():
            task = Task(f"{spec.name}/{structure}/{plane}", spec.name, structure, int(value), spec.modality, plane,
                        axis_of_plane[plane], task_role(spec.name, structure))
            cands = sorted(per_task.get(task.id, []), key=lambda p: (p.slice_index, p.component, p.instance))
            candidates[task.id] = len(cands)
            templates, queries = select(cands, task.id, max_per_task, n_templates, seed)
            if not queries:
                dropped[task.id] = (f"{len(cands)} mask(s) of >= {min_area} px at {size}x{size}; "
                                    f"need {n_templates + 1} (templates + a query)")
                continue
            tasks.append(task)
            query_split = "train" if task.role == "train" else "test"
            plans += [_with_split(p, "template") for p in templates]
            plans += [_with_split(p, query_split) for p in queries]
    used = {p.image_key for p in plans}
    images = {k: v for k, v in images.items() if k in used}
    return DatasetBuild(spec, size, tasks, plans, images, candidates, dropped, shape, spacing)


def slice_label_values(spec: DatasetSpec, size: int = SIZE, axes: str = "supplement") -> dict[str, list[int]]:
    """{image key: the label values with any pixel on that slice at size x size}, for EVERY slice of a volume data
    set (empty ones too), through the same transforms as `build_dataset`. Training uses it to draw queries where a
    task's structure is absent (target: empty), so that the decoder learns "not on this slice". Instance data
    (nuclei) gives {}: there every image holds the class."""
    if spec.instances:
        return {}
    values = list(spec.classes)
    data = volume_transforms(spec)({"image": spec.inputs["image"],
                                    **{role: path for role, path in spec.inputs.items() if role != "image"},
                                    "norm": spec.norm, "ct_window": spec.ct_window})
    data = SelectLabelsd("label", values)(data)
    slices = Compose([SliceVolumed(["image", "label"], axes=axes, skip_empty_key=None),
                      resize_slices([], size, mask_keys=["label"])])(data)
    if isinstance(slices, dict):
        slices = [slices]
    out = {}
    for s in slices:
        label = torch.as_tensor(s["label"]).as_subclass(torch.Tensor).round().long()
        out[f"{spec.name}/{s['plane']}/{s['slice_index']}"] = [int(v) for v in torch.unique(label) if int(v) != 0]
    return out


def _with_split(plan: Plan, split: str) -> Plan:
    return Plan(plan.task, split, plan.image_key, plan.slice_index, plan.axis, plan.value, plan.instance,
                plan.component, plan.n_components, plan.area, plan.bits)


# ---------------------------------------------------------------------------------------------------------------------
# Shards: deterministic .npz files (zip members with a fixed date, arrays without pickles)


def save_shard(path: str, arrays: Mapping[str, np.ndarray], compresslevel: int = 6) -> None:
    """Write `arrays` as a compressed .npz that `numpy.load` reads; byte-identical for identical arrays."""
    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as z:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, buf.getvalue(), compresslevel=compresslevel)

    atomic_write(os.path.abspath(path), write)


def load_shard(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def iter_shard_samples(path: str, split: str | None = None, tasks: Container[str] | None = None) -> Iterator[Sample]:
    """The samples of one shard, images replicated to 3 channels as `DatasetBuild.samples` yields them."""
    a = load_shard(path)
    size = a["images"].shape[-1]
    repeat = RepeatChannelsd("image")
    for i in range(len(a["sample_task"])):
        task, sample_split = str(a["sample_task"][i]), str(a["sample_split"][i])
        if (split is not None and sample_split != split) or (tasks is not None and task not in tasks):
            continue
        j = int(a["sample_image"][i])
        image = repeat({"image": torch.from_numpy(a["images"][j])})["image"].numpy()
        mask = np.unpackbits(a["masks_bits"][i], axis=-1, count=size)
        axis = int(a["sample_axis"][i])
        yield Sample(image, mask, task, sample_split, str(a["source"]), int(a["sample_slice"][i]),
                     None if axis < 0 else axis, int(a["sample_instance"][i]), int(a["sample_component"][i]),
                     int(a["sample_n_components"][i]), int(a["sample_area"][i]), str(a["image_keys"][j]))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
