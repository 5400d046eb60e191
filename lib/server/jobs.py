"""Inference as jobs on a worker pool, off the event loop: every /infer request is one, and /jobs exposes them.

MONAI Label's /infer endpoint runs the task on the event loop, so one whole-volume request froze /info, the
datastore and every other user's clicks for minutes. Here a request becomes a job: a worker thread waits for its
turn on the device (`DeviceTurns`) and runs it, the event loop only waits for the result. A job has an id, a status,
progress, and can be cancelled; its result files are removed when it is forgotten.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import HTTPException

from lib.core.errors import RequestError
from lib.core.progress import Cancelled, Progress, watching
from lib.server.turns import DeviceTurns

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class Job:
    def __init__(self, description: dict, owner: str | None = None):
        self.id = uuid.uuid4().hex
        self.description = description
        self.owner = owner
        self.status = QUEUED
        self.progress = Progress()
        self.result: Any = None
        self.error: dict | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.future: concurrent.futures.Future | None = None
        self.files: list[str] = []  # removed when the job is forgotten

    def as_dict(self) -> dict:
        progress = self.progress.as_dict()
        if self.finished is not None and self.started is not None:
            progress["elapsed_s"], progress["eta_s"] = round(self.finished - self.started, 1), 0.0
        info = {"id": self.id, **self.description, "status": self.status, "progress": progress,
                "created": _iso(self.created), "started": _iso(self.started), "finished": _iso(self.finished)}
        if self.error:
            info["error"] = self.error
        if self.status == DONE and isinstance(self.result, dict):
            info["result"] = self.result.get("params")
        if self.started:
            info["queued_s"] = round(self.started - self.created, 2)
        return info


class JobRunner:
    """`workers` threads run jobs (most of them wait for the device); at most `max_unfinished` jobs queue or
    run at once, beyond that a submit is a 503 that says to retry; finished jobs are kept `keep_s` seconds."""

    def __init__(self, workers: int = 8, max_unfinished: int = 64, keep_s: float = 3600.0):
        self.max_unfinished, self.keep_s = max_unfinished, keep_s
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="infer")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.counts = {DONE: 0, FAILED: 0, CANCELLED: 0}

    def submit(self, work: Callable[[], Any], turns: DeviceTurns, description: dict, owner: str | None = None) -> Job:
        self.reap()
        job = Job(description, owner)
        with self._lock:
            unfinished = sum(j.finished is None for j in self._jobs.values())
            if unfinished >= self.max_unfinished:
                raise RequestError(503, f"the server has {unfinished} requests queued or running; retry shortly")
            self._jobs[job.id] = job
        job.future = self._pool.submit(self._run, job, work, turns)
        return job

    def get(self, job_id: str, user: str | None = None) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (user is not None and job.owner not in (None, user)):
            raise RequestError(404, f"no job {job_id!r}: it never existed, or finished over {self.keep_s:.0f}s ago")
        return job

    def jobs(self, user: str | None = None) -> list[Job]:
        self.reap()
        with self._lock:
            return [j for j in self._jobs.values() if user is None or j.owner in (None, user)]

    def cancel(self, job_id: str, user: str | None = None) -> Job:
        job = self.get(job_id, user)
        job.progress.cancel()
        if job.future is not None and job.future.cancel():  # it had not started
            self._finish(job, CANCELLED)
        return job

    def forget(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            job.progress.cancel()
            for path in job.files:
                _remove(path)

    def reap(self) -> None:
        now = time.time()
        with self._lock:
            old = [j.id for j in self._jobs.values() if j.finished is not None and now - j.finished > self.keep_s]
        for job_id in old:
            self.forget(job_id)

    def stats(self) -> dict:
        with self._lock:
            statuses = [j.status for j in self._jobs.values()]
        return {"queued": statuses.count(QUEUED), "running": statuses.count(RUNNING), "kept": len(statuses),
                **{f"total_{k}": v for k, v in self.counts.items()}}

    def _run(self, job: Job, work: Callable[[], Any], turns: DeviceTurns) -> None:
        try:
            with watching(job.progress), turns.turn(job.progress):
                job.status, job.started = RUNNING, time.time()
                job.progress.step()  # cancelled while queued
                job.result = work()
            for key in ("file", "label"):
                path = job.result.get(key) if isinstance(job.result, dict) else None
                if isinstance(path, str) and os.path.isfile(path) and path.startswith(tempfile.gettempdir()):
                    job.files.append(path)
            self._finish(job, DONE)
        except Cancelled:
            self._finish(job, CANCELLED)
        except HTTPException as e:  # RequestError and FastAPI's: the request's fault
            self._finish(job, FAILED, {"status_code": e.status_code, "detail": e.detail})
        except Exception as e:
            logger.exception(f"job {job.id} ({job.description}) failed")
            self._finish(job, FAILED, {"status_code": 500, "detail": f"{type(e).__name__}: {e}"})

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:
        if job.finished is not None:
            return
        job.status, job.error, job.finished = status, error, time.time()
        with self._lock:
            self.counts[status] += 1


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"
