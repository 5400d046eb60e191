"""MONAI Label's local datastore, with what a shared hospital server needs on top: ids and tags that cannot leave
its folders, uploads checked before they are stored (readable, the image's shape), files written whole or not at
all, and unknown images or labels answered 404 instead of a 500."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Dict

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.core.errors import RequestError, bad_request, not_found
from lib.core.images import IMAGE_2D_EXTENSIONS
from lib.server.paths import check_id, inside



def without_trailing_ones(shape) -> tuple:
    """(X, Y, Z, 1) is (X, Y, Z): a label saved with a channel axis has its image's shape."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def spatial_shape(path: str, extension: str) -> tuple[int, ...] | None:
    """The spatial shape in a NIfTI/NRRD header or a 2D image's (X, Y), reading the file far enough to know it
    is not empty or garbage; None for formats without a cheap header (checked at first use instead). 422 when
    the file cannot be read as that format."""
    try:
        if extension in (".nii", ".nii.gz"):
            import nibabel as nib

            shape = nib.load(path).shape
        elif extension == ".nrrd":
            import nrrd

            shape = tuple(int(s) for s in nrrd.read_header(path)["sizes"])
        elif extension in IMAGE_2D_EXTENSIONS:
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
                shape = tuple(im.size)
        else:
            return None
    except Exception as e:
        raise RequestError(422, f"the upload is not a readable {extension} file: {type(e).__name__}") from e
    shape = without_trailing_ones(shape)
    if not shape or min(shape) < 1:
        raise RequestError(422, f"the upload is an empty image (shape {list(shape)})")
    return tuple(int(s) for s in shape)


def read_label_values(path: str, extension: str) -> np.ndarray | None:
    """A label upload read whole (labels are small), so a truncated file is refused now, not at training."""
    try:
        if extension in (".nii", ".nii.gz"):
            import nibabel as nib

            return np.asarray(nib.load(path).dataobj)
        if extension == ".nrrd":
            import nrrd

            return nrrd.read(path)[0]
        if extension in IMAGE_2D_EXTENSIONS:
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im).T
    except Exception as e:
        raise RequestError(422, f"the label upload is not a readable {extension} file: {type(e).__name__}") from e
    return None


class GuardedLocalDatastore(LocalDatastore):
    def __init__(self, *args, max_image_voxels: int | None = None, **kwargs):
        self.max_image_voxels = max_image_voxels  # an upload larger than this is refused (413): it would not fit
        super().__init__(*args, **kwargs)

    def _extension_of(self, filename: str) -> str:
        _, extension = self._to_id(os.path.basename(filename))
        allowed = [e.replace("*", "") for e in self._extensions]
        if extension.lower() not in allowed:
            raise bad_request(f"file type {extension!r} is not one this datastore holds: {', '.join(allowed)}")
        return extension

    def _copy_into(self, source: str, folder: str, name: str) -> str:
        """Copy `source` to `folder`/`name`, whole or not at all, refusing any destination outside `folder`."""
        dest = os.path.join(folder, name)
        if not inside(self._datastore_path, folder) or not inside(folder, dest):
            raise bad_request("that name would put the file outside the datastore")
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload_")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return dest

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        extension = self._extension_of(image_filename)
        image_id = check_id(image_id or self._to_id(os.path.basename(image_filename))[0])
        shape = spatial_shape(image_filename, extension.lower())
        if shape and self.max_image_voxels and int(np.prod(shape, dtype=np.int64)) > self.max_image_voxels:
            raise RequestError(413, f"the image has {int(np.prod(shape, dtype=np.int64)):,} voxels {list(shape)}; "
                                    f"this server takes at most {self.max_image_voxels:,} (max_image_mvoxels)")
        name = self._filename(image_id, extension)
        with FileLock(self._lock_file):
            self._copy_into(image_filename, self._datastore.image_path(), name)
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_id(image_id)
        check_id(label_tag, "label tag")
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise not_found(f"unknown image {image_id!r}: it is not in the datastore")
        extension = self._extension_of(label_filename)
        values = read_label_values(label_filename, extension.lower())
        image_shape = spatial_shape(image_uri, self._to_id(os.path.basename(image_uri))[1].lower())
        if values is not None and image_shape is not None:
            shape = without_trailing_ones(values.shape)
            if tuple(shape) != image_shape:
                raise bad_request(f"the label has shape {list(shape)}, its image {image_id!r} {list(image_shape)}")
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise bad_request("the label has NaN or infinite values")
        name = self._filename(image_id, extension)
        with FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            self._copy_into(label_filename, self._datastore.label_path(label_tag), name)
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        if not self.get_image_uri(check_id(image_id)):
            raise not_found(f"unknown image {image_id!r}")
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if not self.get_label_uri(check_id(label_id), check_id(label_tag, "label tag")):
            raise not_found(f"no label {label_tag!r} for image {label_id!r}")
        super().remove_label(label_id, label_tag)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        if not self.get_image_uri(image_id):
            raise not_found(f"unknown image {str(image_id)[:80]!r}")
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        if not self.get_label_uri(label_id, label_tag):
            raise not_found(f"no label {str(label_tag)[:80]!r} for image {str(label_id)[:80]!r}")
        return super().get_label_info(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        if not self.get_image_uri(image_id):
            raise not_found(f"unknown image {str(image_id)[:80]!r}")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        if not self.get_label_uri(label_id, label_tag):
            raise not_found(f"no label {str(label_tag)[:80]!r} for image {str(label_id)[:80]!r}")
        super().update_label_info(label_id, label_tag, info)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and inside(self._datastore_path, uri) else ""

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        return uri if uri and inside(self._datastore_path, uri) else ""
