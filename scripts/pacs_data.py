"""The sample volumes as DICOM series for the PACS set-up (scripts/pacs.sh), reproducibly, with their real geometry.

    .venv/bin/python scripts/pacs_data.py OUT_DIR      # OUT_DIR/<name>/IM0001.dcm ... , OUT_DIR/series.json

Each volume of sample-data (Colin27 T1, the head CT, MNI152 T1) becomes one series of one study of one patient:
MR or CT Image Storage, one file per axial slice (the NIfTI's third voxel axis), pixels unchanged (integers; CT in
HU through RescaleIntercept), ImageOrientationPatient / ImagePositionPatient / PixelSpacing from the NIfTI affine
(RAS, as nibabel reads it) turned into DICOM's LPS. Column c of a DICOM row is voxel i, row r is voxel j, so a
DICOM reader (ITK, GDCM, OHIF) rebuilds the NIfTI's own voxel grid. UIDs are `2.25.<name-based UUID>` of fixed
strings: the same files on every run. The labelled volumes' final labels become DICOM SEG later, in the running
PACS, through the app's own label save (the same code path as OHIF's Submit).
"""

from __future__ import annotations

import json
import os
import sys
import uuid

import nibabel as nib
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample-data")

# name: (file in sample-data, modality, patient name, study description, final label in sample-data/labels/final)
VOLUMES = {
    "colin27_t1": ("colin27_t1.nii.gz", "MR", "Colin27^Template", "Colin27 T1 (MNI), 1 mm", "colin27_t1.nii.gz"),
    "head_ct": ("head_ct.nii.gz", "CT", "Anonymous^Cranium", "InVesalius example head CT", "head_ct.nii.gz"),
    "mni152_t1": ("mni152_t1.nii.gz", "MR", "MNI152^2009a", "MNI152 2009a T1 template, 1 mm", None),
}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def uid(*parts: str) -> str:
    """A deterministic DICOM UID: 2.25 + a name-based UUID (v5) as an integer."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "monailabel-pacs/" + "/".join(parts)).int)


def series_geometry(affine: np.ndarray):
    """(row direction, column direction, spacing i, j, k) in LPS from a NIfTI affine: a DICOM row runs along voxel
    axis i, a column along j."""
    axes = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return axes[:, 0] / spacing[0], axes[:, 1] / spacing[1], spacing


def write_series(name: str, out_dir: str) -> dict:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    file, modality, patient, description, _ = VOLUMES[name]
    img = nib.load(os.path.join(SAMPLE, file))
    volume = np.asanyarray(img.dataobj)
    if not np.array_equal(volume, np.round(volume)) or volume.min() < -32768 or volume.max() > 32767:
        raise ValueError(f"{file}: expected integer voxels that fit int16")
    volume = volume.astype(np.int16)
    row_dir, col_dir, spacing = series_geometry(img.affine)
    study, series, frame = uid(name, "study"), uid(name, "series"), uid(name, "frame-of-reference")
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(volume.shape[2]):
        position = RAS_TO_LPS @ (img.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        sop = uid(name, "instance", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyDate = ds.SeriesDate = "20261201"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.Manufacturer = "", "", "MONAI Label sample data"
        ds.Modality = modality
        ds.StudyDescription = description
        ds.SeriesDescription = f"{name} axial"
        ds.PatientName, ds.PatientID = patient, name.upper()
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.BodyPartExamined = "HEAD"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.7f}", f"{spacing[0]:.7f}"]  # between rows (j), between columns (i)
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{spacing[2]:.7f}"
        ds.SliceLocation = f"{float(np.dot(position, np.cross(row_dir, col_dir))):.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        pixels = np.ascontiguousarray(volume[:, :, k].T)  # (rows = j, columns = i)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = pixels.tobytes()
        ds.save_as(os.path.join(folder, f"IM{k + 1:04d}.dcm"), write_like_original=False)
    return {"study": study, "series": series, "slices": int(volume.shape[2]), "modality": modality,
            "folder": folder, "label": VOLUMES[name][4]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    series = {name: write_series(name, out) for name in VOLUMES}
    with open(os.path.join(out, "series.json"), "w") as f:
        json.dump(series, f, indent=1)
    for name, s in series.items():
        print(f"{name}: {s['slices']} {s['modality']} slices, series {s['series']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
