"""MONAI Label endpoints served with their input checked first, then handed to MONAI Label's own code.

Its handlers took `params` that is not a JSON object (`true`, `null`, text) and failed with a 500, ran uploads on
the event loop, and answered a CPU host's /logs/gpu with a 500. These routes parse and check what the client sent
(400 with a reason) and, being plain functions, run on FastAPI's thread pool.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from typing import List, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, UploadFile
from fastapi.responses import Response
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints import activelearning as activelearning_endpoints
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import session as session_endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

from lib.core.errors import RequestError, bad_request
from lib.server.paths import check_session_id

router = APIRouter()
annotator = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)


def json_object(text: str | None, name: str) -> str:
    """`text` if it is a JSON object (or empty), as JSON text; else 400."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as e:
        raise bad_request(f"'{name}' must be a JSON object: {e}") from e
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be a JSON object, got {type(value).__name__}")
    return json.dumps(value)


@router.put("/datastore/", include_in_schema=False)
@router.put("/datastore/image", summary=f"{RBAC_ANNOTATOR}Upload new Image", tags=["Datastore"])
def add_image(background_tasks: BackgroundTasks, image: Optional[str] = None, params: str = Form("{}"),
              file: UploadFile = File(...), user: User = Depends(annotator)):
    return datastore_endpoints.add_image(background_tasks, image, json_object(params, "params"), file,
                                         user.username)


@router.put("/datastore/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label", tags=["Datastore"])
def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
               tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...), user: User = Depends(annotator)):
    return datastore_endpoints.save_label(background_tasks, image, json_object(params, "params"), tag, label,
                                          user.username)


# MONAI Label runs these on the event loop; on a PACS each may fetch and convert a whole series first, so here they
# run on the thread pool and every other request keeps being answered.
reader = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)


@router.head("/datastore/image", summary=f"{RBAC_USER}Check If Image Exists", tags=["Datastore"])
def check_image(image: str, check_sum: Optional[str] = None, user: User = Depends(reader)):
    return datastore_endpoints.download_image(image, check_only=True, check_sum=check_sum)


@router.get("/datastore/image", summary=f"{RBAC_USER}Download Image", tags=["Datastore"])
def download_image(image: str, user: User = Depends(reader)):
    return datastore_endpoints.download_image(image)


@router.head("/datastore/label", summary=f"{RBAC_USER}Check If Label Exists", tags=["Datastore"])
def check_label(image: str, tag: str, user: User = Depends(reader)):
    return datastore_endpoints.download_label(image, tag, check_only=True)


@router.get("/datastore/label", summary=f"{RBAC_USER}Download Label", tags=["Datastore"])
def download_label(label: str, tag: str, user: User = Depends(reader)):
    return datastore_endpoints.download_label(label, tag)


@router.post("/activelearning/{strategy}", summary=f"{RBAC_USER}Run Active Learning strategy to get next sample",
             tags=["ActiveLearning"])
def next_sample(strategy: str, params: Optional[dict] = None, user: User = Depends(reader)):
    # A strategy may run a model first (ours score an image with SAMauto): on the thread pool, not the event loop.
    return activelearning_endpoints.sample(strategy, params, user.username)


@router.put("/datastore/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info", tags=["Datastore"])
def update_image_info(image: str, info: str = Form("{}"), user: User = Depends(annotator)):
    return datastore_endpoints.update_image_info(image, json_object(info, "info"), user.username)


@router.put("/datastore/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info", tags=["Datastore"])
def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(annotator)):
    return datastore_endpoints.update_label_info(label, tag, json_object(info, "info"), user.username)


@router.put("/session/", summary=f"{RBAC_USER}Create new session with Image", tags=["Session"])
def create_session(background_tasks: BackgroundTasks, uncompress: bool = False, expiry: int = 0,
                   files: List[UploadFile] = File(...), user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    if expiry < 0 or expiry > 365 * 24 * 3600:
        raise bad_request("'expiry' is in seconds: 0 (the server's default) up to a year")
    for upload in files:
        upload.file.seek(0, 2)
        size = upload.file.tell()
        upload.file.seek(0)
        if size == 0:
            raise RequestError(422, f"the upload {upload.filename!r} is empty")
        if uncompress and not (zipfile.is_zipfile(upload.file) or _is_tar(upload.file)):
            raise RequestError(422, f"uncompress=true, but {upload.filename!r} is not a zip or tar archive")
        upload.file.seek(0)
    try:
        return session_endpoints.create_session(background_tasks, uncompress, expiry, files)
    except shutil.ReadError as e:  # MONAI Label unpacks by the file's name, not its content (found by fuzzing)
        raise RequestError(422, f"uncompress=true: cannot unpack the upload ({e}); name it .zip, .tar or .tar.gz") from e


@router.get("/session/{session_id}", summary=f"{RBAC_USER}Get Session ID", tags=["Session"])
def get_session(session_id: str, update_ts: bool = False, image: bool = False,
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    check_session_id(session_id)  # MONAI Label joins it into a path
    if image:
        session = app_instance().sessions().get_session(session_id, update_ts=False)
        if session and os.path.isdir(session.image):
            raise RequestError(409, "this session holds a series of files, not one image file to download")
    return session_endpoints.get_session(session_id, update_ts, image)


@router.delete("/session/{session_id}", summary=f"{RBAC_USER}Delete Session", tags=["Session"])
def remove_session(session_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    return session_endpoints.remove_session(check_session_id(session_id))


def _is_tar(f) -> bool:
    try:
        with tarfile.open(fileobj=f):
            return True
    except (tarfile.TarError, OSError, EOFError):
        return False
    finally:
        f.seek(0)


@router.get("/logs/gpu", summary=f"{RBAC_ADMIN}Get GPU Info (nvidia-smi)", tags=["Others"])
def gpu_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    import subprocess

    if shutil.which("nvidia-smi") is None:
        raise RequestError(404, "this server has no NVIDIA GPU (nvidia-smi is not installed)")
    result = subprocess.run(["nvidia-smi"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    return Response(content=result.stdout.decode("utf-8", "replace"), media_type="text/plain")
