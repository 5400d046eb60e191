"""The DICOMweb datastore (a PACS such as Orthanc): MONAI Label's, offline and with its ids checked.

- MONAI Label downloads dcmqi's `itkimage2segimage` from GitHub at start-up (it converts a saved label to DICOM SEG)
  and fails offline. The pinned PyPI wheel `dcmqi` ships the same tool; `use_packaged_dcmqi` puts it on PATH and
  says clearly when it is missing. Why dcmqi and not highdicom or pydicom-seg for writing: it is what MONAI Label's
  own save path calls (one way to write SEG, the one its readers were tested with), it needs no newer pydicom
  (highdicom needs pydicom 3; pydicom-seg, which MONAI Label reads SEG with, breaks on pydicom 3), and it is
  QIICR's reference implementation of the SEG standard. Reading stays MONAI Label's (pydicom-seg).
- Series UIDs and label tags become folder names in the datastore's cache: an id such as `../../x` would read and
  write outside it. Ids must be DICOM UIDs, tags the datastore's safe names.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from monailabel.datastore.dicom import DICOMWebDatastore

from lib.core.errors import bad_request
from lib.server.paths import check_id

DCMQI_TOOL = "itkimage2segimage"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def use_packaged_dcmqi() -> str:
    """The path of `itkimage2segimage` from the environment's own scripts (the `dcmqi` wheel), put first on PATH."""
    scripts = os.path.dirname(sys.executable)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    tool = shutil.which(DCMQI_TOOL)
    if tool is None:
        raise RuntimeError(f"{DCMQI_TOOL} (DICOM SEG writer) not found: install the pinned PyPI wheel dcmqi "
                           f"(bash scripts/setup.sh does); this server never downloads it")
    return tool


def check_uid(value, what: str = "image") -> str:
    if not isinstance(value, str) or len(value) > 64 or not UID.match(value):
        raise bad_request(f"{what} must be a DICOM UID (digits and dots) on a DICOMweb datastore")
    return value


class GuardedDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore whose ids are checked before they become cache paths."""

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(check_uid(image_id))

    def get_image_info(self, image_id: str):
        return super().get_image_info(check_uid(image_id))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        check_uid(label_id, "label"), check_id(label_tag, "tag")
        if image_id:
            check_uid(image_id)
        return super().get_label_uri(label_id, label_tag, image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info, label_id: str = "") -> str:
        check_uid(image_id), check_id(label_tag, "tag")
        return super().save_label(image_id, label_filename, label_tag, label_info, label_id)


def guarded(datastore: DICOMWebDatastore) -> GuardedDICOMWebDatastore:
    """The datastore MONAI Label built (its DICOMweb client comes from MONAI Label's settings: credentials, QIDO/WADO
    prefixes, Google Cloud), now checking ids; the subclass adds methods only, no state."""
    datastore.__class__ = GuardedDICOMWebDatastore
    return datastore
