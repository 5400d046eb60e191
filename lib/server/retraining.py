"""Retraining by itself (issue 16): when `retrain_after_new_labels` new labelled slices of a label have been saved
since its model was trained, the label's training runs again with its last run's parameters, and its uncertainty
scores are recomputed once it is published.

- Which labels: every label a LabelTrainTask has published with its retrain info (`lib.core.training`), any method.
- Counting: slices of the datastore's final labels that hold the label's value, along the axis it was trained on
  (`lib.core.active_learning.LabelledSlices`), against the count the published run saw.
- One run at a time: the runs go to MONAI Label's own train queue (one worker; `POST /train` uses it too), so a
  trigger while a run is going is queued, not dropped. A label has at most one triggered run waiting: a save while
  one waits adds nothing, that run will read the new labels when it starts. A run that fails leaves the served model
  as it was (the train tasks publish only at the end) and is not retried until new labels come.
- Everything here runs on one background thread: a label save never waits for it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time

from monailabel.utils.async_tasks.utils import run_background_task

from lib.core.active_learning import LabelledSlices
from lib.core.training import LabelTrainTask

logger = logging.getLogger(__name__)

WAITING, RUNNING = "SUBMITTED", "RUNNING"


class RetrainTriggers:
    def __init__(self, trainers, datastore, scoring_methods, threshold: int):
        """trainers(): {name: train task}; datastore(): the app's datastore; scoring_methods(): their names.
        threshold: new labelled slices that start a retrain (0: never)."""
        self.trainers, self.datastore, self.scoring_methods = trainers, datastore, scoring_methods
        self.threshold = int(threshold)
        self.counter = LabelledSlices()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retrain")
        self._lock = threading.Lock()
        self._submitted: dict[tuple[str, str], dict] = {}  # (model, label) -> the triggered task and what it saw
        self._labels: dict[str, dict[str, dict]] = {}  # model -> label -> its status, for /info
        self._checked: float | None = None
        self._pending_check = False
        self._store_stamps: dict[str, int | None] = {}  # model -> its label store folder's mtime at the last check

    # -- events -------------------------------------------------------------------------------------------------
    def label_saved(self, image_id: str) -> None:
        logger.info(f"label saved for {image_id}: counting labelled slices for retraining")
        self.request_check()

    def request_check(self) -> None:
        with self._lock:
            if self._pending_check:  # one queued check reads everything saved before it runs
                return
            self._pending_check = True
        self._pool.submit(self._check_logged)

    def status(self) -> dict:
        """For /info: the setting, and per model and label what is labelled, when and on what it was trained, its
        validation and whether a retrain waits or runs. Counts are those of the last check (after each save)."""
        if self._checked is None or self._stores_changed():  # e.g. a run someone started was published
            self.request_check()
        with self._lock:
            labels = {model: {label: dict(s) for label, s in per.items()} for model, per in self._labels.items()}
            for (model, label), submitted in self._submitted.items():
                entry = labels.get(model, {}).get(label)
                if entry is not None:
                    entry["retrain"] = self._task_summary(submitted)
        return {"retrain_after_new_labels": self.threshold, "labels": labels,
                "counted_at": None if self._checked is None else time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                               time.gmtime(self._checked))}

    def _stores_changed(self) -> bool:
        # One stat per train task: a published result replaces files in its store's folder.
        return any(_mtime(task.store.root) != self._store_stamps.get(model)
                   for model, task in self.trainers().items() if _retrainable(task))

    # -- the check ----------------------------------------------------------------------------------------------
    def _check_logged(self) -> None:
        with self._lock:
            self._pending_check = False
        try:
            self.check()
        except Exception:
            logger.exception("retraining check failed")

    def check(self) -> None:
        datastore = self.datastore()
        labels: dict[str, dict[str, dict]] = {}
        for model, task in sorted(self.trainers().items()):
            if not _retrainable(task):
                continue
            self._store_stamps[model] = _mtime(task.store.root)
            for label, published in sorted(task.store.info().items()):
                retrain = published.get("retrain")
                if not retrain:  # a result from before retraining existed: trained by hand only
                    continue
                axis = retrain.get("axis")
                per_image = self.counter.per_image(datastore, int(published["label_value"]), int(axis or 2),
                                                   retrain.get("labelled_2d"))
                labelled = sum(len(s) for s in per_image.values())
                status = {"label_value": published["label_value"], "labelled_slices": labelled,
                          "labelled_images": len(per_image), "trained_at": published.get("trained_at"),
                          "trained_on_slices": published.get("num_slices"),
                          "labelled_slices_at_training": retrain["labelled_slices"],
                          "validation": published.get("validation")}
                status["new_since_training"] = labelled - retrain["labelled_slices"]
                status["retrain_pending"] = self._maybe_submit(model, task, label, retrain, labelled)
                labels.setdefault(model, {})[label] = status
        with self._lock:
            self._labels, self._checked = labels, time.time()

    def _maybe_submit(self, model: str, task: LabelTrainTask, label: str, retrain: dict, labelled: int) -> bool:
        """Submit a retrain when enough is new; whether one waits or runs for the label."""
        with self._lock:
            submitted = self._submitted.get((model, label))
        active = submitted is not None and submitted["task"]["status"] in (WAITING, RUNNING)
        if self.threshold <= 0:
            return active
        if active and submitted["task"]["status"] == WAITING:
            return True  # it will read these labels when it starts
        base = max(retrain["labelled_slices"], submitted["labelled_slices"] if submitted else 0)
        if labelled - base < self.threshold:
            return active
        params = task.retrain_params(retrain, labelled)
        request = {"model": model, **params}
        logger.info(f"retraining {model} {label!r}: {labelled - base} new labelled slices (>= {self.threshold}); "
                    f"request {request}")
        started = run_background_task(request, "train", callback=lambda t: self._finished(model, label, t))
        with self._lock:
            self._submitted[(model, label)] = {"task": started, "labelled_slices": labelled,
                                               "submitted_at": time.time()}
        return True

    def _finished(self, model: str, label: str, task: dict) -> None:
        logger.info(f"retraining {model} {label!r}: {task['status']}")
        if task["status"] == "DONE":
            # The label's model changed: its stored uncertainty scores are stale (they carry the old model's
            # stamp), so its scoring methods run again, in the background (MONAI Label's scoring queue).
            for method in self.scoring_methods():
                if method.startswith(f"{model}_"):
                    run_background_task({"method": method, "label": label}, "scoring")
        self.request_check()  # labels saved while it ran

    @staticmethod
    def _task_summary(submitted: dict) -> dict:
        task = submitted["task"]
        return {"id": task["id"], "status": task["status"], "start_ts": task.get("start_ts"),
                "end_ts": task.get("end_ts"), "labelled_slices": submitted["labelled_slices"]}


def _retrainable(task) -> bool:
    # TP-DRSeg trains all its lesion classes into one model, with no label store: retrained by hand only.
    return isinstance(task, LabelTrainTask) and task.store is not None


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
