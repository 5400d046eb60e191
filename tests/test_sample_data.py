"""The bundled sample data: every image loads, labels match their images, the README documents every file.

Reads the files directly (nibabel, Pillow, pydicom): no server, no MONAI transforms, well under 5 s.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample-data")
DICOM = os.path.join(REPO, "sample-data-dicom")
DICOM_SERIES = os.path.join(DICOM, "head_ct_axial")
LABELS = os.path.join(SAMPLE, "labels", "final")
SIZE_LIMIT = 15 * 2**20  # sample-data/ + sample-data-dicom/
# Written by MONAI Label at run time and git-ignored: not part of the bundled data.
RUNTIME_FILES = {".lock", "datastore_v2.json"}

# image -> (expected spatial shape as read: NIfTI voxel order, PNG (height, width)), expected label values
EXPECTED = {
    "colin27_t1.nii.gz": ((181, 217, 181), set(range(117))),
    "head_ct.nii.gz": ((256, 256, 60), {0, 1, 2}),
    "retina.png": ((512, 512), {0, 1}),
    "nuclei.png": ((512, 512), None),  # instance ids: checked separately
    # SYNTHETIC lesions on a real fundus background (TP-DRSeg): 1 MA, 2 HE, 3 EX, 4 SE, every class present
    "fundus_synthetic_lesions.png": ((512, 512), {0, 1, 2, 3, 4}),
}
# images with NO label on purpose (the datastore's unlabelled studies, for batch inference) -> expected shape
UNLABELLED = {
    # MNI ICBM152 2009a symmetric T1 from the nilearn 0.14.1 wheel: a second brain, in Colin27's MNI space
    "mni152_t1.nii.gz": (197, 233, 189),
}
# SHA-256 of the uncompressed NIfTI (header + voxels): the wheel's file, byte for byte (only re-gzipped)
MNI152_NIFTI_SHA256 = "eeb8a792a93948c83462305c71db783800e95eb3f6ce35975a4dd0f374f79bff"


def bundled_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name in RUNTIME_FILES or name.startswith("."):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def images() -> list[str]:
    return sorted(f for f in os.listdir(SAMPLE)
                  if os.path.isfile(os.path.join(SAMPLE, f)) and f.endswith((".nii.gz", ".png")))


def read(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(array, affine) — NIfTI in voxel order with its affine; PNG as (height, width[, channels]) and no affine."""
    if path.endswith(".nii.gz"):
        img = nib.load(path)
        return np.asanyarray(img.dataobj), img.affine
    with Image.open(path) as im:
        return np.asarray(im), None


def test_the_expected_images_and_only_those_are_bundled():
    assert images() == sorted({**EXPECTED, **UNLABELLED})
    assert sorted(os.listdir(LABELS)) == sorted(EXPECTED)  # the unlabelled images have no final label


@pytest.mark.parametrize("name", sorted(UNLABELLED))
def test_unlabelled_image_loads_and_has_no_label_anywhere(name):
    image, affine = read(os.path.join(SAMPLE, name))
    assert image.shape == UNLABELLED[name] and np.isfinite(image).all() and image.max() > image.min()
    for dirpath, _, filenames in os.walk(os.path.join(SAMPLE, "labels")):
        assert name not in filenames, os.path.join(dirpath, name)


def test_mni152_is_the_wheel_template_unchanged_in_colin27s_mni_space():
    path = os.path.join(SAMPLE, "mni152_t1.nii.gz")
    with open(path, "rb") as f:
        stream = f.read()
    # deterministic gzip wrapper (as every NIfTI here): no file name (FLG 0), mtime 0
    assert stream[:3] == b"\x1f\x8b\x08" and stream[3] == 0 and stream[4:8] == b"\0\0\0\0"
    assert hashlib.sha256(gzip.decompress(stream)).hexdigest() == MNI152_NIFTI_SHA256
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8 and data.min() == 0 and data.max() == 255
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.header.get_zooms() == (1.0, 1.0, 1.0)
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 0  # as shipped: the sform rules
    # same world space as Colin27 (and its AAL): both 1 mm RAS grids, an integer shift apart
    colin = nib.load(os.path.join(SAMPLE, "colin27_t1.nii.gz"))
    mni_to_colin = np.linalg.inv(colin.affine) @ img.affine
    np.testing.assert_allclose(mni_to_colin[:3, :3], np.eye(3))
    np.testing.assert_allclose(mni_to_colin[:3, 3], (-8, -9, -1))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_image_loads_and_label_matches_it(name):
    shape, values = EXPECTED[name]
    image, affine = read(os.path.join(SAMPLE, name))
    label, label_affine = read(os.path.join(LABELS, name))
    assert image.shape[: len(shape)] == shape and label.shape == shape
    assert np.issubdtype(label.dtype, np.integer)
    assert np.isfinite(image).all() and image.max() > image.min()
    if affine is not None:
        np.testing.assert_allclose(label_affine, affine, atol=1e-5)
    if values is not None:
        assert set(np.unique(label).tolist()) == values


def test_png_modes():
    for path in ("retina.png", "fundus_synthetic_lesions.png"):
        with Image.open(os.path.join(SAMPLE, path)) as im:
            assert im.mode == "RGB", path
    for path in ("nuclei.png", "labels/final/nuclei.png", "labels/final/retina.png",
                 "labels/final/fundus_synthetic_lesions.png"):
        with Image.open(os.path.join(SAMPLE, path)) as im:
            assert im.mode == "L", path


def test_head_ct_is_hounsfield_int16_on_an_las_millimetre_grid():
    img = nib.load(os.path.join(SAMPLE, "head_ct.nii.gz"))
    hu = np.asanyarray(img.dataobj)
    assert hu.dtype == np.int16 and hu.min() == -1024 and 1000 < hu.max() < 3072
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (0.9570312, 0.9570312, 1.5), rtol=1e-6)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    label = np.asanyarray(nib.load(os.path.join(LABELS, "head_ct.nii.gz")).dataobj)
    assert np.all(hu[label == 1] > 300)
    inside = hu[label == 2]  # 0..80 HU, plus holes (noise, calcifications) filled inside it
    assert np.mean((inside >= 0) & (inside <= 80)) > 0.95
    assert 200 < np.median(hu[label == 1]) and 10 < np.median(hu[label == 2]) < 60


def test_colin27_aal_is_ras_and_its_names_cover_every_label():
    img = nib.load(os.path.join(LABELS, "colin27_t1.nii.gz"))
    t1 = nib.load(os.path.join(SAMPLE, "colin27_t1.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.header.get_zooms() == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(t1.get_qform(), t1.get_sform())
    aal = np.asanyarray(img.dataobj)
    with open(os.path.join(SAMPLE, "labels", "colin27_aal_names.json")) as f:
        names = json.load(f)
    assert sorted(int(k) for k in names) == list(range(1, 117))
    assert names["1"] == "Precentral_L" and names["2"] == "Precentral_R"
    # a *_L region lies at world x < 0 and its *_R twin at x > 0 (RAS)
    for value, sign in ((1, -1), (2, 1)):
        centroid = np.argwhere(aal == value).mean(axis=0)
        assert sign * (img.affine @ np.r_[centroid, 1])[0] > 10


def test_nuclei_label_holds_instance_ids():
    label, _ = read(os.path.join(LABELS, "nuclei.png"))
    ids = np.unique(label)
    assert ids[0] == 0 and len(ids) == 126 and ids.max() == 183


def test_dicom_series_matches_the_nifti_in_world_coordinates():
    pydicom = pytest.importorskip("pydicom")
    files = sorted(os.listdir(DICOM_SERIES))
    assert files == [f"IM{n:04d}.dcm" for n in range(1, 9)]
    ct = nib.load(os.path.join(SAMPLE, "head_ct.nii.gz"))
    hu = np.asanyarray(ct.dataobj)
    inverse = np.linalg.inv(ct.affine)
    series = set()
    for name in files:
        ds = pydicom.dcmread(os.path.join(DICOM_SERIES, name))
        series.add(ds.SeriesInstanceUID)
        assert ds.Modality == "CT" and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        pixels = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # DICOM pixel (row r, column c) sits at IPP + c * dc * X + r * dr * Y in LPS
        ipp = np.array(ds.ImagePositionPatient, float)
        x_dir, y_dir = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in ((0, 0), (0, 255), (255, 0), (100, 140)):
            lps = ipp + c * dc * x_dir + r * dr * y_dir
            ijk = inverse @ np.r_[-lps[0], -lps[1], lps[2], 1.0]
            idx = np.rint(ijk[:3]).astype(int)
            np.testing.assert_allclose(ijk[:3], idx, atol=1e-3)
            assert hu[tuple(idx)] == pixels[r, c]
        k = int(np.rint((inverse @ np.r_[-ipp[0], -ipp[1], ipp[2], 1.0])[2]))
        np.testing.assert_array_equal(pixels, hu[:, ::-1, k].T)  # the whole slice, not only four pixels
    assert len(series) == 1


def test_readme_table_lists_every_bundled_file():
    with open(os.path.join(SAMPLE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {re.match(r"\| `([^`]+)`", row).group(1) for row in rows}
    for rel in bundled_files(SAMPLE):
        if rel == "README.md":
            continue
        assert rel in listed, f"sample-data/{rel} is not in the README table"
    assert f"../sample-data-dicom/{os.path.basename(DICOM_SERIES)}/" in listed
    for row in rows:  # every row says where it came from and under which licence
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6 and all(cells), row


def test_total_size_is_under_the_limit():
    total = sum(os.path.getsize(os.path.join(SAMPLE, p)) for p in bundled_files(SAMPLE))
    total += sum(os.path.getsize(os.path.join(DICOM, p)) for p in bundled_files(DICOM))
    assert total < SIZE_LIMIT, f"{total / 2**20:.1f} MiB"
