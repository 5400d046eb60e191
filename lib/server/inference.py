"""/infer/{model} off the event loop, and /jobs for long work: submit, watch progress, fetch, cancel.

`POST /infer/{model}` takes what MONAI Label's takes (Slicer and OHIF are unchanged) and answers the same way,
but runs as a job on the worker pool while the event loop keeps serving; a client that hangs up cancels it.
`POST /jobs/infer/{model}` takes the same and answers 202 with a job id at once: `GET /jobs/{id}` gives its
status and progress, `GET /jobs/{id}/result` its label, `DELETE /jobs/{id}` cancels or forgets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from lib.core.errors import RequestError, bad_request, not_found
from lib.server.jobs import CANCELLED, DONE, FAILED, Job, JobRunner
from lib.server.paths import check_request_paths, check_session_id
from lib.server.turns import DeviceTurns

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Infer"])
turns = DeviceTurns()  # the models of one server share one device (configs/app.yaml `device`)
user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
# Logged with each request (what was clicked, where): the prompts Slicer, OHIF and the other clients send.
PROMPT_FIELDS = ("foreground", "background", "roi", "points", "point_labels", "label", "label_prompt", "slice",
                 "axis", "text", "template")


class _Runner:
    """The server's JobRunner, built at first use from the app's settings (infer_workers, max_queued_jobs)."""

    def __init__(self):
        self._runner: JobRunner | None = None

    def __getattr__(self, name):
        if self._runner is None:
            conf = getattr(app_instance(), "settings", {})
            self._runner = JobRunner(int(conf.get("infer_workers", 8)), int(conf.get("max_queued_jobs", 64)))
        return getattr(self._runner, name)


runner = _Runner()


def server_stats() -> dict:
    """Jobs and the device queue, for /info."""
    runner_ = runner._runner
    return {"jobs": runner_.stats() if runner_ is not None else None, "device": turns.stats()}


def parse_params(params: str | None) -> dict:
    try:
        value = json.loads(params) if params else {}
    except (TypeError, ValueError) as e:
        raise bad_request(f"'params' must be a JSON object: {e}") from e
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'params' must be a JSON object, got {type(value).__name__}")
    return value


def _save_upload(upload: UploadFile) -> str:
    suffix = "".join(pathlib.Path(upload.filename).suffixes)[-16:] if upload.filename else ".nii.gz"
    fd, path = tempfile.mkstemp(suffix=suffix if all(c.isalnum() or c == "." for c in suffix) else "")
    with os.fdopen(fd, "wb") as buffer:
        shutil.copyfileobj(upload.file, buffer)
    return path


async def build_request(model: str, image: str, session_id: str, params: str | None, file: UploadFile | None,
                        label: UploadFile | None, temp_files: list) -> dict:
    """MONAI Label's infer request from the endpoint's fields, checked: the model exists, the image is the
    datastore's (or an upload or a session), no field names a server file."""
    instance = app_instance()
    if model not in instance._infers:  # MONAI Label keeps its tasks there; it has no public lookup
        raise not_found(f"no model {model!r}; the server has: {', '.join(sorted(instance._infers))}")
    request = {"model": model, **parse_params(params), "image": image}
    allow_server_paths = bool(getattr(instance, "settings", {}).get("allow_server_paths", False))
    check_request_paths(request, allow_server_paths, uploaded_label=label is not None)
    if file:
        request["image"] = await run_in_threadpool(_save_upload, file)
        temp_files.append(request["image"])
    if label:
        label_file = await run_in_threadpool(_save_upload, label)
        temp_files.append(label_file)
        if label_file.endswith(".bin"):  # OHIF's scribbles: raw voxels on the image's grid
            from monailabel.datastore.utils.convert import binary_to_image

            label_file = await run_in_threadpool(
                lambda: binary_to_image(instance.datastore().get_image_uri(image), label_file))
            temp_files.append(label_file)
        request["label"] = label_file
    if session_id:
        check_session_id(session_id)
        session = instance.sessions().get_session(session_id)
        if not session:
            raise not_found(f"no session {session_id!r}: it expired or never existed")
        request["image"], request["session"] = session.image, session.to_json()
    if not request["image"]:
        raise bad_request("say which image: 'image' (a datastore id), an uploaded 'file' or a 'session_id'")
    if not (file or session_id or (allow_server_paths and os.path.isabs(request["image"]))):
        # On a PACS this may fetch and convert the series: off the event loop.
        if not await run_in_threadpool(instance.datastore().get_image_uri, request["image"]):
            raise not_found(f"unknown image {request['image']!r}: it is not in the datastore")
    return request


async def start(model: str, image: str, session_id: str, params: str | None, file: UploadFile | None,
                label: UploadFile | None, user: User | None) -> Job:
    """The request as a submitted job; the uploads it was given are removed when the job is forgotten."""
    temp_files: list = []
    try:
        request = await build_request(model, image, session_id, params, file, label, temp_files)
        description = {"model": request["model"], "image": os.path.basename(str(request.get("image", "")))}
        prompts = {k: request[k] for k in PROMPT_FIELDS if request.get(k) not in (None, [], "")}
        logger.info(f"infer {model} on {image or session_id or 'an upload'}: {json.dumps(prompts)[:500]}")
        instance = app_instance()
        job = runner.submit(lambda: instance.infer(request), turns, description, owner=_owner(user))
    except BaseException:
        for path in temp_files:
            _remove(path)
        raise
    job.files.extend(temp_files)
    return job


def _owner(user: User | None) -> str | None:
    return user.username if settings.MONAI_LABEL_AUTH_ENABLE and user is not None else None


def _raise_failure(job: Job):
    error = job.error or {"status_code": 500, "detail": "the job failed"}
    raise RequestError(error["status_code"], error["detail"])


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def respond(job: Job, output: Optional[ResultType], background_tasks: BackgroundTasks):
    datastore = app_instance().datastore()
    if output == ResultType.dicom_seg:
        raise bad_request("output=dicom_seg needs a DICOMweb datastore; this server's is local")
    return send_response(datastore, job.result, output, background_tasks)


@router.post("/infer/{model}", summary=f"{RBAC_USER}Run Inference for supported model")
async def infer(http_request: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
                session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),
                label: UploadFile = File(None), output: Optional[ResultType] = None,
                user: User = Depends(user_role)):
    job = await start(model, image, session_id, params, file, label, user)
    background_tasks.add_task(runner.forget, job.id)  # after the answer: its files go with it
    waiting = asyncio.wrap_future(job.future)
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=0.25)
        if not waiting.done() and await http_request.is_disconnected():
            runner.cancel(job.id)  # the worker stops at its next step and takes the next request
            logger.info(f"client left: cancelled {job.description} ({job.progress.as_dict()})")
            return Response(status_code=499)
    if job.status != DONE:
        _raise_failure(job)
    return respond(job, output, background_tasks)


@router.post("/jobs/infer/{model}", status_code=202, summary=f"{RBAC_USER}Start inference as a job")
async def start_job(model: str, image: str = "", session_id: str = "", params: str = Form("{}"),
                    file: UploadFile = File(None), label: UploadFile = File(None), user: User = Depends(user_role)):
    job = await start(model, image, session_id, params, file, label, user)
    return JSONResponse(job.as_dict(), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/jobs/", summary=f"{RBAC_USER}Jobs of this user, newest first")
async def list_jobs(user: User = Depends(user_role)):
    jobs = sorted(runner.jobs(_owner(user)), key=lambda j: j.created, reverse=True)
    return {"jobs": [j.as_dict() for j in jobs], **runner.stats(), "device": turns.stats()}


@router.get("/jobs/{job_id}", summary=f"{RBAC_USER}A job's status and progress")
async def job_status(job_id: str, user: User = Depends(user_role)):
    return runner.get(job_id, _owner(user)).as_dict()


@router.get("/jobs/{job_id}/result", summary=f"{RBAC_USER}A finished job's label (as /infer answers)")
async def job_result(job_id: str, output: Optional[ResultType] = None, user: User = Depends(user_role)):
    job = runner.get(job_id, _owner(user))
    if job.status in (FAILED,):
        _raise_failure(job)
    if job.status == CANCELLED:
        raise RequestError(409, f"job {job_id} was cancelled")
    if job.status != DONE:
        raise RequestError(409, f"job {job_id} is {job.status} ({job.progress.as_dict()}); poll /jobs/{job_id}")
    return respond(job, output, BackgroundTasks())  # the files stay until the job is forgotten


@router.delete("/jobs/{job_id}", summary=f"{RBAC_USER}Cancel a job, or forget a finished one and its files")
async def cancel_job(job_id: str, user: User = Depends(user_role)):
    job = runner.get(job_id, _owner(user))
    if job.finished is None:
        runner.cancel(job_id, _owner(user))
        return {"id": job_id, "status": "cancelling" if job.finished is None else job.status}
    runner.forget(job_id)
    return {"id": job_id, "status": "forgotten"}
