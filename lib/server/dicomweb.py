"""The DICOMweb datastore (a PACS such as Orthanc): MONAI Label's, offline, with its ids checked and its cache kept
bounded and current.

- MONAI Label downloads dcmqi's `itkimage2segimage` from GitHub at start-up (it converts a saved label to DICOM SEG)
  and fails offline. The pinned PyPI wheel `dcmqi` ships the same tool; `use_packaged_dcmqi` puts it on PATH and
  says clearly when it is missing. Why dcmqi and not highdicom or pydicom-seg for writing: it is what MONAI Label's
  own save path calls (one way to write SEG, the one its readers were tested with), it needs no newer pydicom
  (highdicom needs pydicom 3; pydicom-seg, which MONAI Label reads SEG with, breaks on pydicom 3), and it is
  QIICR's reference implementation of the SEG standard. Reading stays MONAI Label's (pydicom-seg).
- Series UIDs and label tags become folder names in the datastore's cache: an id such as `../../x` would read and
  write outside it. Ids must be DICOM UIDs, tags the datastore's safe names.
- MONAI Label's cache of a series (its instances, then one NIfTI) is never refreshed and never shrinks, a download cut
  short stays as a broken series, two requests for one series download it into the same folder at once, and
  `GET /datastore/label?tag=final` reads the image series as if it were the SEG (a 500). Here each series is
  downloaded whole or not at all under its own lock; it is fetched again when its instances on the PACS change
  (checked at most every `revalidate_s`); the least recently used series leave the cache beyond `cache_bytes`; the
  final label of a series is the newest SEG on the PACS that references it, with its segment names.
- Orthanc lists one modality per query (no DICOM list matching), so the image modalities are queried one by one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time

import requests
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.core.errors import RequestError, bad_request, not_found
from lib.server.paths import check_id

logger = logging.getLogger(__name__)

DCMQI_TOOL = "itkimage2segimage"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
FINAL = DefaultLabelTag.FINAL.value


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


def pacs_unreachable(error: Exception) -> RequestError:
    return RequestError(503, f"the PACS (DICOMweb) did not answer: {type(error).__name__}; try again when it is up")


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.exists(os.path.join(root, f)))
    return total


class GuardedDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with checked ids and a bounded, current, whole-or-nothing series cache.
    `guarded()` makes one from the datastore MONAI Label built and sets its state."""

    modalities: list[str]
    cache_bytes: int
    revalidate_s: float

    def _init_cache(self, modalities: list[str], cache_bytes: int, revalidate_s: float) -> None:
        self.modalities, self.cache_bytes, self.revalidate_s = modalities, cache_bytes, revalidate_s
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._state_lock = threading.RLock()  # the state below and eviction
        self._seg_refs: dict[str, tuple[str, str]] = {}  # SEG series UID -> (referenced series, sort key)
        self._checked: dict[str, float] = {}  # series UID -> when its instances were last compared with the PACS
        self._state_path = self._datastore_path.rstrip(os.sep) + ".series.json"
        try:
            with open(self._state_path) as f:
                self._state = json.load(f)  # series UID -> {"fingerprint", "used"}
        except (OSError, ValueError):
            self._state = {}

    # ---- ids --------------------------------------------------------------------------------------------------

    def get_image_info(self, image_id: str):
        return super().get_image_info(check_uid(image_id))

    def _dicom_info(self, series_id: str) -> dict:
        found = self._search_series(SeriesInstanceUID=series_id)
        if not found:
            raise not_found(f"series {series_id} is not on the PACS")
        info = {"SeriesInstanceUID": series_id}
        for field in ("StudyDate", "StudyTime", "Modality", "RetrieveURL", "PatientID", "StudyInstanceUID"):
            info[field] = str(found[0][field].value) if found[0].get(field) else "UNK"
        return info

    def _series_lock(self, uid: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.RLock())

    def _save_state(self) -> None:
        with self._state_lock:
            tmp = self._state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self._state, f)
            os.replace(tmp, self._state_path)

    # ---- listing ----------------------------------------------------------------------------------------------

    def _search_series(self, **filters) -> list[Dataset]:
        try:
            return [Dataset.from_json(s) for s in self._client.search_for_series(search_filters=filters)]
        except requests.RequestException as e:
            raise pacs_unreachable(e) from e

    def list_images(self) -> list[str]:
        filters = {k: v for k, v in self._search_filter.items() if k != "Modality"}
        series = []
        for modality in self.modalities or [None]:
            query = {**filters, **({"Modality": modality} if modality else {})}
            series += [str(s.SeriesInstanceUID) for s in self._search_series(**query)]
        return sorted(set(series))

    def _seg_reference(self, seg: Dataset) -> tuple[str, str]:
        """(the series a SEG series references, its sort key: newest last). A SEG's metadata can be megabytes (its
        per-frame groups) and never changes: read once per SEG."""
        uid = str(seg.SeriesInstanceUID)
        if uid not in self._seg_refs:
            try:
                meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg.StudyInstanceUID), uid)[0])
            except requests.RequestException as e:
                raise pacs_unreachable(e) from e
            referenced = meta.get("ReferencedSeriesSequence")
            key = f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}|{meta.get('InstanceCreationTime', '')}"
            self._seg_refs[uid] = (str(referenced[0].SeriesInstanceUID) if referenced else "", key)
        return self._seg_refs[uid]

    def _segs_of(self, image_id: str) -> list[tuple[str, str]]:
        """[(sort key, SEG series UID)] of the SEG series in the image's study that reference it, oldest first."""
        study = self._dicom_info(image_id)["StudyInstanceUID"]
        found = []
        for seg in self._search_series(Modality="SEG", StudyInstanceUID=study):
            referenced, key = self._seg_reference(seg)
            if referenced == image_id:
                found.append((key, str(seg.SeriesInstanceUID)))
        return sorted(found)

    def get_labeled_images(self, label_tag=None, labels=None) -> list[str]:
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        images = set(self.list_images())
        return sorted({ref for ref in (self._seg_reference(seg)[0] for seg in self._search_series(Modality="SEG"))
                       if ref in images})

    def status(self) -> dict:
        """/info's datastore counts; with the PACS down /info still answers (OHIF's panel connects with it)."""
        try:
            return super().status()
        except RequestError as e:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": e.detail}

    def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    # ---- images -----------------------------------------------------------------------------------------------

    def _fingerprint(self, uid: str) -> str:
        try:
            instances = self._client.search_for_instances(search_filters={"SeriesInstanceUID": uid},
                                                          fields=["SOPInstanceUID"], get_remaining=True)
        except requests.RequestException as e:
            raise pacs_unreachable(e) from e
        sops = sorted(str(Dataset.from_json(i).SOPInstanceUID) for i in instances)
        if not sops:
            raise not_found(f"series {uid} is not on the PACS")
        return hashlib.sha256("\n".join(sops).encode()).hexdigest()

    def _download(self, uid: str, folder: str) -> None:
        """The series' instances into `folder`, whole or not at all."""
        partial = tempfile.mkdtemp(prefix=f".{uid[-12:]}.", dir=os.path.dirname(folder))
        try:
            dicom_web_download_series(None, uid, partial, self._client, self._fetch_by_frame)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        except requests.RequestException as e:
            raise pacs_unreachable(e) from e
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def get_image_uri(self, image_id: str) -> str:
        uid = check_uid(image_id)
        with self._series_lock(uid):
            folder = os.path.join(self._datastore.image_path(), uid)
            nifti = folder + ".nii.gz"
            entry = self._state.get(uid)
            fetched = False
            present = os.path.isdir(folder) and os.listdir(folder) and os.path.exists(nifti)
            if not present or entry is None or time.time() - self._checked.get(uid, 0) > self.revalidate_s:
                try:
                    fingerprint = self._fingerprint(uid)
                except RequestError as e:
                    if not (present and entry and e.status_code == 503):
                        raise
                    logger.warning(f"series {uid}: the PACS did not answer; serving the cached copy")
                    fingerprint = entry["fingerprint"]
                self._checked[uid] = time.time()
                if not present or entry is None or entry["fingerprint"] != fingerprint:
                    if present:
                        logger.info(f"series {uid} changed on the PACS: fetching it again")
                    self._download(uid, folder)
                    converted = dicom_to_nifti(folder)
                    try:
                        LocalDatastore.add_image(self, uid, converted, self._dicom_info(uid))
                    finally:
                        os.unlink(converted)
                    entry = {"fingerprint": fingerprint,
                             "bytes": sum(folder_bytes(p) for p in self._series_files(uid) if os.path.exists(p))}
                    fetched = True
            with self._state_lock:
                self._state[uid] = {**entry, "used": time.time()}
                if fetched:
                    self._save_state()  # a click only refreshes `used` in memory: no file write per click
        if fetched:
            self._evict(keep=uid)  # only a download grows the cache
        return nifti if self._convert_to_nifti else folder

    def _series_files(self, uid: str) -> list[str]:
        images, finals = self._datastore.image_path(), self._datastore.label_path(FINAL)
        files = [os.path.join(images, uid), os.path.join(images, uid + ".nii.gz"), os.path.join(finals, uid + ".nii.gz")]
        seg = self._final_info(uid).get("SeriesInstanceUID")
        if seg and UID.match(seg):
            files.append(os.path.join(finals, seg))
        return files

    def _evict(self, keep: str) -> None:
        """Drop the least recently used series (instances, NIfTI, final label: all fetched again on use) until the
        cache fits `cache_bytes`; never one in use."""
        if self.cache_bytes <= 0:
            return
        with self._state_lock:
            self._evict_locked(keep)

    def _evict_locked(self, keep: str) -> None:
        # Sizes as measured at download (a final label fetched later is not counted: SEGs are small).
        sizes = {uid: entry.get("bytes", 0) for uid, entry in self._state.items()}
        total = sum(sizes.values())
        for uid in sorted(self._state, key=lambda u: self._state[u].get("used", 0)):
            if total <= self.cache_bytes:
                break
            lock = self._series_lock(uid)
            if uid == keep or not lock.acquire(blocking=False):
                continue
            try:
                for path in self._series_files(uid):
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                        os.path.exists(path) and os.unlink(path))
                self._state.pop(uid, None)
                self._checked.pop(uid, None)
                total -= sizes[uid]
                logger.info(f"DICOMweb cache: series {uid} evicted ({sizes[uid] / 2**20:.0f} MiB)")
            finally:
                lock.release()
        self._save_state()

    # ---- final labels (DICOM SEG) -------------------------------------------------------------------------------

    def _final_info(self, image_id: str) -> dict:
        obj = self._datastore.objects.get(image_id)
        label = obj.labels.get(FINAL) if obj else None
        return dict(label.info or {}) if label else {}

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """`label_id` is the image's series UID, as MONAI Label's endpoints and training pass it; MONAI Label's own
        reconciliation passes the SEG series UID with `image_id`."""
        check_uid(label_id, "label"), check_id(label_tag, "tag")
        if label_tag != FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        image_id = check_uid(image_id) if image_id else label_id
        segs = self._segs_of(image_id)
        if not segs:
            return ""
        seg = segs[-1][1]
        with self._series_lock(image_id):
            self.get_image_uri(image_id)  # the label lives beside its image in the local cache
            nifti = os.path.join(self._datastore.label_path(FINAL), image_id + ".nii.gz")
            if os.path.exists(nifti) and self._final_info(image_id).get("SeriesInstanceUID") == seg:
                return nifti
            folder = os.path.join(self._datastore.label_path(FINAL), seg)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            self._download(seg, folder)
            converted = self._on_image_grid(dicom_to_nifti(folder, is_seg=True), image_id)
            try:
                for stale in glob.glob(os.path.join(self._datastore.label_path(FINAL), image_id + ".*")):
                    os.unlink(stale)
                LocalDatastore.save_label(self, image_id, converted, FINAL,
                                          {**self._dicom_info(seg), "label_info": self._segment_names(folder)})
            finally:
                os.unlink(converted)
            return nifti

    def _on_image_grid(self, decoded: str, image_id: str) -> str:
        """The decoded SEG (a .nrrd of the frames it holds) as a NIfTI on the image's own voxel grid, like every
        other label a client downloads."""
        import SimpleITK as sitk

        image = sitk.ReadImage(os.path.join(self._datastore.image_path(), image_id + ".nii.gz"))
        label = sitk.Resample(sitk.ReadImage(decoded), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              sitk.sitkUInt8)
        os.unlink(decoded)
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        sitk.WriteImage(label, out)
        return out

    @staticmethod
    def _segment_names(folder: str) -> list[dict]:
        import pydicom

        names = []
        for name in sorted(os.listdir(folder)):
            ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
            names += [{"name": str(s.SegmentLabel), "idx": int(s.SegmentNumber)} for s in ds.SegmentSequence]
        return names

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info, label_id: str = "") -> str:
        """OHIF's Submit sends the viewer's labelmap as raw bytes (`label.bin`) and every segment of the viewer as
        {name, idx}; the SEG gets the segments the label holds, named, in order of their values."""
        check_uid(image_id), check_id(label_tag, "tag")
        with self._series_lock(image_id):
            converted = ""
            try:
                if label_filename.endswith(".bin"):
                    image = self.get_image_uri(image_id)
                    try:
                        converted = label_filename = binary_to_image(image, label_filename)
                    except ValueError as e:
                        raise bad_request(f"the label's voxels do not fit series {image_id}: {e}") from e
                values = self._label_values(label_filename)
                if not values:
                    raise bad_request("the label is empty: nothing to save")
                names = (label_info or {}).get("label_info")
                if isinstance(names, list) and names and all(isinstance(n, dict) and "idx" in n for n in names):
                    label_info["label_info"] = sorted((n for n in names if int(n["idx"]) in values),
                                                      key=lambda n: int(n["idx"]))
                return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
            except requests.RequestException as e:
                raise pacs_unreachable(e) from e
            finally:
                if converted and os.path.exists(converted):
                    os.unlink(converted)

    @staticmethod
    def _label_values(path: str) -> set[int]:
        # Read as MONAI Label's SEG writer reads it (nifti_to_dicom_seg): the names must follow its values.
        import numpy as np
        from monai.transforms import LoadImage

        return {int(v) for v in np.unique(np.asarray(LoadImage(image_only=True)(path)))} - {0}


def guarded(datastore: DICOMWebDatastore, modalities: str = "CT,MR", cache_mb: int = 20480,
            revalidate_s: float = 60) -> GuardedDICOMWebDatastore:
    """The datastore MONAI Label built (its DICOMweb client comes from MONAI Label's settings: credentials, QIDO/WADO
    prefixes, Google Cloud), now a GuardedDICOMWebDatastore."""
    datastore.__class__ = GuardedDICOMWebDatastore
    # dicomweb-client retries every failure 5 times with exponential waits: 30 s before a click hears that the PACS
    # is down. One retry after half a second.
    datastore._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
    datastore._init_cache([m.strip() for m in str(modalities).split(",") if m.strip()], int(cache_mb) * 2**20,
                          float(revalidate_s))
    return datastore
