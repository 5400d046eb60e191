"""What the per-label train tasks (SAMassist, MSA adapters) share: reading a training request (which label, its
voxel value, from which images), the labelled slices, MONAI Label's BasicTrainTask hooks they both leave empty,
train_stats that say what a run is doing, that it failed and why, or that it was stopped; and their validation
records, from which each infer task's `auto` picks, per kind of prompt, the learned result or what answers without
it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.core import requests
from lib.core.active_learning import slices_holding
from lib.core.cache import EmbeddingKey, LRUCache
from lib.core.errors import RequestError
from lib.core.backbone import SamEncoding
from lib.core.predictor import PredictorSettings
from lib.core.device import pick_device
from lib.core.runtime import FrozenForward, resolve_runtime
from lib.core.transforms.geometry import extract_slice
from lib.core.images import load_image
from lib.core.stores import LabelStore, atomic_write

logger = logging.getLogger(__name__)

MIN_VALIDATION_AREA = 30  # pixels: smaller cross-sections are slivers a person would not click on


class TrainingRequestError(ValueError):
    """A training request that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class AnnotatedSlice:
    image: str
    label: str
    axis: int | None  # None: a 2D image
    index: int | None
    role: str  # "train" or "validation"


def number_field(request: dict, key: str, low: float, high: float, cast=float):
    """request[key] as `cast` (int or float), within [low, high]; else a TrainingRequestError that says why."""
    try:
        return requests.number(request, key, None, low, high, cast)
    except RequestError as e:
        raise TrainingRequestError(e.detail) from e


def int_field(request: dict, key: str, low: int, high: int) -> int:
    return number_field(request, key, low, high, int)


def named_value(datastore, image_id: str, name: str) -> int | None:
    """The value a client saved under `name` with an image's final label (Slicer's label_info), if any."""
    for entry in datastore.get_label_info(image_id, "final").get("label_info", []) or []:
        if isinstance(entry, dict) and str(entry.get("name", "")).lower() == name.lower() and "idx" in entry:
            return int(entry["idx"])
    return None


def label_value_for(name: str, request: dict, datastore, image_ids: list[str]) -> tuple[int, list[str]]:
    """The voxel value of a named label and the images to learn it from: the request's `label_value` (all
    labelled images, or the request's `images`), else the value a client saved under that name (the images whose
    labels name it: a value means one structure only where the labels say so)."""
    if request.get("label_value") not in (None, ""):
        return int_field(request, "label_value", *requests.LABEL_VALUE_RANGE), image_ids
    named = {i: named_value(datastore, i, name) for i in image_ids}
    named = {i: v for i, v in named.items() if v is not None}
    if not named:
        raise TrainingRequestError(f"no saved label names {name!r}: give its voxel value as 'label_value'")
    value = next(iter(named.values()))
    return value, [i for i, v in named.items() if v == value]


def count_labelled_slices(cases: list[tuple[str, str]], value: int, axis: int | None) -> dict:
    """{"labelled_slices": the slices along `axis` of the cases' labels that hold `value` (a 2D label: one),
    "labelled_2d": whether those are 2D images}, of the one kind of image the training reads (labelled_volumes),
    as the server counts them for retraining (lib.core.active_learning.LabelledSlices)."""
    count, kind = 0, None
    for _, _, mask, is_2d in labelled_volumes(cases, value):
        count += 1 if is_2d or axis is None else len(slices_holding(mask, axis))
        kind = is_2d
    return {"labelled_slices": count, "labelled_2d": kind}


def labelled_volumes(cases: list[tuple[str, str]], value: int):
    """(image path, label path, boolean mask of `value`, is_2d) for each case holding the label, keeping to one
    kind of image: the first that holds it decides 2D or 3D (the other kind holds other things under the same
    value, e.g. an instance id in a 2D mask that is a brain region's value in a 3D atlas)."""
    kind = None
    for image_path, label_path in cases:
        label = load_image(label_path)
        mask = label.array[0].numpy().round() == value
        if not mask.any() or kind not in (None, label.is_2d):
            continue
        kind = label.is_2d
        yield image_path, label_path, mask, label.is_2d


def foreground_slices(mask: np.ndarray, axis: int) -> list[int]:
    """Slices along `axis` whose cross-section of the mask is large enough to prompt (MIN_VALIDATION_AREA)."""
    areas = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(1)
    return np.nonzero(areas >= MIN_VALIDATION_AREA)[0].tolist()


def evenly_spread(items: list, count: int) -> list:
    """`count` of the items (all when fewer), evenly spread over the list, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


# How a result was validated (its record's "method"): on labelled slices it did not learn from; where too few were
# labelled to hold any out, by learning again without each training slice and scoring that slice; or not at all.
HELD_OUT, LEAVE_ONE_SLICE_OUT, NOT_VALIDATED = "held_out", "leave_one_slice_out", "none"
PROMPT_KINDS = ("click", "box", "box_then_clicks")


def combined_figures(parts: list[dict]) -> dict:
    """validate_prompts' figures over several sets of slices (the folds of a leave-one-slice-out validation) as
    one: the mean over all their slices."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    weights = np.asarray([p["slices"] for p in parts], dtype=float)
    mean = lambda values: round(float(np.average(values, weights=weights)), 4)
    return {"slices": int(weights.sum()), "one_click_dice": mean([p["one_click_dice"] for p in parts]),
            "box_dice": mean([p["box_dice"] for p in parts]),
            "box_then_clicks_dice": [mean(step) for step in zip(*(p["box_then_clicks_dice"] for p in parts))]}


def held_out_record(figures: dict, **details) -> dict:
    """The validation record of a result scored on held-out slices; figures: {"learned"/"vanilla"...: figures}."""
    slices = max((f.get("slices", 0) for f in figures.values()), default=0)
    return {"method": HELD_OUT, "slices": slices, "held_out_slices": slices, **figures, **details}


def leave_one_out_record(folds: list[dict], names: tuple[str, ...], **details) -> dict:
    """The validation record of a result learned on every labelled slice: each fold ({"slice": where, name:
    figures}) learned without its slice and scored it; the figures under each name are the folds' mean. No slice
    was held out of the result itself (held_out_slices 0)."""
    return {"method": LEAVE_ONE_SLICE_OUT, "slices": len(folds), "held_out_slices": 0,
            **{name: combined_figures([fold[name] for fold in folds]) for name in names}, "folds": folds, **details}


def no_validation_record(note: str) -> dict:
    return {"method": NOT_VALIDATED, "slices": 0, "held_out_slices": 0, "note": note}


def prompt_kind(has_box: bool, has_clicks: bool) -> str:
    """Which of PROMPT_KINDS a prompt is: clicks only, a box only, or a box with (corrective) clicks."""
    return ("box_then_clicks" if has_clicks else "box") if has_box else "click"


def validated_figure(figures: dict | None, kind: str) -> float | None:
    """The validation Dice for a kind of prompt: one click; the jittered box; the box after its corrective clicks."""
    figures = figures or {}
    if kind == "click":
        return figures.get("one_click_dice")
    if kind == "box":
        return figures.get("box_dice")
    steps = figures.get("box_then_clicks_dice")
    return steps[-1] if steps else None


def auto_choice(validation: dict | None, learned: str, baseline: str, default: dict[str, str]) -> dict[str, str]:
    """Per prompt kind, which of a learned result (its validation figures under `learned`) and what answers without
    it (under `baseline`) validated better; where the figures tie or either is missing, `default`'s choice."""
    validation = validation or {}
    choice = {}
    for kind in PROMPT_KINDS:
        ours, theirs = (validated_figure(validation.get(name), kind) for name in (learned, baseline))
        if ours is None or theirs is None or ours == theirs:
            choice[kind] = default[kind]
        else:
            choice[kind] = learned if ours > theirs else baseline
    return choice


def labelled_cases(request: dict, datastore) -> tuple[str, int, list[tuple[str, str]]]:
    """(label name, voxel value, [(image path, final label path)]) for a training request; clear errors otherwise."""
    name = str(request.get("label") or "").strip()
    if not name:
        raise TrainingRequestError("say which label to learn: 'label' (e.g. the segment's name in Slicer)")
    image_ids = datastore.get_labeled_images("final")
    if request.get("images"):
        wanted = request["images"] if isinstance(request["images"], list) else [request["images"]]
        unknown = sorted(set(map(str, wanted)) - set(image_ids))
        if unknown:
            raise TrainingRequestError(f"'images' {unknown} are not in the datastore or have no final label")
        image_ids = [i for i in image_ids if i in set(map(str, wanted))]
    if not image_ids:
        raise TrainingRequestError("no image in the datastore has a final label yet: save labels first")
    value, image_ids = label_value_for(name, request, datastore, image_ids)
    return name, value, [(datastore.get_image_uri(i), datastore.get_label_uri(i, "final")) for i in image_ids]


class LabelTrainTask(BasicTrainTask):
    """A BasicTrainTask that learns something small for one label of a frozen model and publishes it to a
    LabelStore; subclasses plan the slices (pre_process) and build the ignite trainer."""

    method = "training"  # the name logs and errors use
    running_statuses = ("training", "validating")

    def __init__(self, model_dir: str, description: str, config: dict, model_factory, store: LabelStore,
                 device=None, modality: str | None = None, ct_window=None,
                 predictor_settings: PredictorSettings | None = None, encoder_runtime: str = "eager",
                 runtime_cache_dir: str | None = None):
        """encoder_runtime, runtime_cache_dir: where the frozen image encoder runs (lib.core.runtime), as in serving."""
        super().__init__(model_dir, description, config=config, amp=False,
                         stats_path=os.path.join(model_dir, "train_stats.json"))
        for unused in ("max_epochs", "val_split", "early_stop_patience"):  # our own epochs and validation
            self._config.pop(unused)
        self._config["multi_gpu"] = False  # small, short runs: never worth spawning processes
        self.model_factory = model_factory
        self.store = store
        self.requested_device = device
        self.modality = modality or None
        self.ct_window = ct_window
        self.predictor_settings = predictor_settings or PredictorSettings()
        self.encoder_runtime, self.runtime_cache_dir = encoder_runtime, runtime_cache_dir
        self._volumes = LRUCache(3)  # the image and label of the current case

    @classmethod
    def from_settings(cls, model_dir: str, model_factory, store: LabelStore, settings: dict,
                      runtime_cache_dir: str | None = None):
        """A task configured by the app's settings: same device, modality, prompt handling and encoder runtime as
        the infer task."""
        return cls(model_dir, model_factory, store, device=settings["device"], modality=settings["modality"],
                   ct_window=settings["ct_window"], predictor_settings=PredictorSettings(zoom=settings["zoom"]),
                   encoder_runtime=settings.get("encoder_runtime", "auto"), runtime_cache_dir=runtime_cache_dir)

    def frozen_encoder(self, model, device: torch.device):
        """The frozen `model.encode` through the task's runtime (the graph the infer task built, from the cache)."""
        return FrozenForward(SamEncoding(model), resolve_runtime(self.encoder_runtime, device), self.runtime_cache_dir,
                             name=f"{self.method} encoder")

    def __call__(self, request, datastore):
        try:
            return super().__call__(request, datastore)
        except Exception as e:
            self._write_stats({"status": "failed", "label": request.get("label"), "error": str(e)})
            logger.error(f"{self.method} failed: {e}")
            raise

    # -- retraining (lib/server/retraining.py) ----------------------------------------------------------------
    def retrain_info(self, request: dict) -> dict:
        """What a published result keeps so that the server can run it again by itself when new labels come: the
        run's own fields (this task's config keys) and how many labelled slices, of which kind of image, the
        datastore had for the label (count_labelled_slices, put in the request by pre_process)."""
        params = {k: request[k] for k in self._config if k in request and k != "multi_gpu"}
        return {"params": {**params, "label": request["label"], "label_value": request["label_value"]},
                "axis": request.get("axis", 2), "labelled_slices": int(request["labelled_slices"]),
                "labelled_2d": request["labelled_2d"]}

    def retrain_params(self, retrain: dict, labelled_slices: int) -> dict:
        """The request of a retrain: the last run's own (a method may learn from more of the new labels)."""
        return dict(retrain["params"])

    # -- BasicTrainTask hooks both methods leave empty ---------------------------------------------------------
    def partition_datalist(self, context: Context, shuffle=False):
        # Validation is ours (prompt simulation after the last step), not an ignite evaluator per epoch.
        return [p for p in context.datalist if p["role"] == "train"], []

    def load_path(self, output_dir, pretrained=True):
        return None  # every run starts from the pretrained model, never from another label's result

    def _device(self, context: Context) -> torch.device:
        return pick_device(self.requested_device)

    # Slices are read, normalised and encoded once by network(); the loader yields indices into them.
    def train_pre_transforms(self, context: Context):
        return []

    def train_post_transforms(self, context: Context):
        return []

    def val_inferer(self, context: Context):
        return None

    def finalize(self, context):
        pass  # stats are written as the run goes (MONAI Label's publisher expects an evaluator's metrics)

    # -- data, stats -------------------------------------------------------------------------------------------
    def annotated_slice(self, plan: dict, value: int) -> tuple[torch.Tensor, np.ndarray]:
        """(C, rows, cols) image slice in [0, 1] (normalised as the infer task does) and its (rows, cols) mask."""
        return self.annotated_slice_at(plan["image"], plan["label"], plan["axis"], plan["index"], value)

    def validation_slice(self, plan: dict, value: int) -> tuple:
        """A planned slice as lib.core.evaluation.validate_prompts takes it: (image slice, mask, axis, index, the
        key its embeddings are cached under)."""
        slice_image, mask = self.annotated_slice(plan, value)
        return slice_image, mask, plan["axis"], plan["index"], EmbeddingKey(plan["image"], None, plan["axis"],
                                                                             plan["index"])

    def annotated_slice_at(self, image_path: str, label_path: str, axis, index, value: int):
        image, _ = self._volumes.get_or_compute(image_path, lambda: load_image(image_path))
        label, _ = self._volumes.get_or_compute(label_path, lambda: load_image(label_path))
        _, intensity = image.intensity(self.modality, self.ct_window)
        mask = extract_slice(label.array[:1], axis, index)[0].numpy().round() == value
        return image.normalised_slice(axis, index, intensity), mask

    def stats(self):
        """train_stats for /info; a run that was stopped (or died) cannot say so itself: no process, no progress."""
        from monailabel.utils.async_tasks.utils import processes

        stats = super().stats()
        if stats.get("status") in self.running_statuses and not processes("train"):
            stats = {**stats, "status": "stopped"}
        return stats

    def _write_stats(self, stats: dict) -> None:
        os.makedirs(os.path.dirname(self._stats_path), exist_ok=True)
        atomic_write(self._stats_path, lambda f: f.write(json.dumps(stats, indent=2).encode()))
