"""Active learning on SAMauto (issue 16): Next Sample hands out the image, and the slice in it, where the label's
automatic model is least sure (lib/sammed/uncertainty.py), and a scoring method computes those scores over the
datastore in the background.

- Scores are kept in the datastore's image info, `uncertainty.<label>`: the model's stamp (the SAP-Net file's
  version), the image's score (mean 1 − Dice of the coarse and refined masks), the axis and each slice's score
  (the pixels where they disagree). A score of an older model, or of an older scoring rule, is not used: after a
  retrain the image is scored again.
- Which label: the request's `label`; without one, the one label SAMauto has learned (OHIF's panel sends `{}`).
  Its voxel value: the request's `label_value`, else the learned one, else the value the team saved under that name.
- No model for the label yet (or no label at all): the rules of lib/core/active_learning.py (largest unlabelled
  image; the slice farthest from the labelled ones).
- A Next Sample call scores at most `score_budget` unscored images itself (default 2, the largest first): a click
  should not wait for a whole datastore; `POST /scoring/<model>_uncertainty` scores the rest.
"""

from __future__ import annotations

import logging
import os

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.core import active_learning as rules
from lib.core.errors import bad_request, not_found
from lib.core.images import load_image
from lib.core.requests import LABEL_VALUE_RANGE, integer
from lib.core.training import named_value

logger = logging.getLogger(__name__)

SCORE_KEY = "uncertainty"
SLICE_SCORE = "disagreeing pixels"  # what an entry's per-slice scores count; entries of another rule are stale
ASKED_KEY = "asked"


def next_uncertain_slice(scores: dict[int, float], excluded) -> tuple[int, float] | None:
    """The slice with the highest uncertainty score that is not excluded (labelled, or asked before); ties: the
    lower index. None when no scored slice is left."""
    excluded = set(int(k) for k in excluded)
    free = {int(k): u for k, u in scores.items() if int(k) not in excluded}
    if not free:
        return None
    k = max(sorted(free), key=lambda s: free[s])
    return k, free[k]


class SAMautoScores:
    """The uncertainty of a label's SAMauto model on datastore images: stored, or computed by the SAMauto task."""

    def __init__(self, auto_task, prompt_store):
        self.auto_task = auto_task
        self.prompt_store = prompt_store

    def learned(self) -> list[str]:
        return sorted(self.auto_task.learned_labels())

    def meta(self, label: str) -> dict:
        return self.prompt_store.meta(label) or {}

    def stamp(self, label: str) -> int | None:
        return self.prompt_store.stamp(label, "sapnet")

    def resolve(self, request: dict, datastore) -> tuple[str | None, int | None]:
        """(label, voxel value) the request is about; (None, None): any label."""
        label = str(request.get("label") or "").strip() or None
        if label is None:
            learned = self.learned()
            if len(learned) > 1:
                raise bad_request(f"say which label: 'label', one of {', '.join(learned)}")
            label = learned[0] if learned else None
        if request.get("label_value") not in (None, ""):
            return label, integer(request, "label_value", None, *LABEL_VALUE_RANGE)
        if label is None:
            return None, None
        if self.meta(label).get("label_value") is not None:
            return label, int(self.meta(label)["label_value"])
        for image_id in sorted(datastore.list_images()):
            value = named_value(datastore, image_id, label)
            if value is not None:
                return label, value
        raise not_found(f"no label {label!r}: nothing learned or saved under that name; give 'label_value' too")

    def has_model(self, label: str | None) -> bool:
        return label is not None and label in self.learned()

    def stored(self, datastore, image_id: str, label: str) -> dict | None:
        entry = (datastore.get_image_info(image_id) or {}).get(SCORE_KEY, {}).get(label)
        fresh = entry and entry.get("model") == self.stamp(label) and entry.get("slice_score") == SLICE_SCORE
        return entry if fresh else None

    def compute(self, datastore, image_id: str, label: str) -> dict:
        """One SAMauto pass over the image; its scores, stored in the image's info."""
        path, info = self.auto_task({"image": datastore.get_image_uri(image_id), "label": label,
                                     "result_extension": ".nii.gz"})
        if path and os.path.exists(path):
            os.unlink(path)
        entry = {"model": self.stamp(label), "slice_score": SLICE_SCORE, "axis": info["axis"], **info["uncertainty"]}
        scores = dict((datastore.get_image_info(image_id) or {}).get(SCORE_KEY, {}))
        scores[label] = entry
        datastore.update_image_info(image_id, {SCORE_KEY: scores})
        logger.info(f"uncertainty of {label!r} on {image_id}: {entry['image']}")
        return entry

    def score(self, datastore, image_id: str, label: str) -> dict:
        return self.stored(datastore, image_id, label) or self.compute(datastore, image_id, label)


def _refresh(datastore) -> None:
    # A scoring run writes the image info from its own process; read what it wrote.
    refresh = getattr(datastore, "refresh", None)
    if refresh:
        refresh()


class UncertainImage(Strategy):
    """The unlabelled image where the label's SAMauto model is least sure."""

    def __init__(self, scores: SAMautoScores):
        super().__init__("The unlabelled image where the label's automatic model (SAMauto) is least sure; the "
                         "largest unlabelled image while nothing is learned")
        self.scores = scores

    def info(self):
        return {**super().info(), "config": {"label": "", "label_value": "", "score_budget": 2}}

    def __call__(self, request, datastore):
        _refresh(datastore)
        label, value = self.scores.resolve(request, datastore)
        candidates = rules.unlabelled_images(datastore, value)
        if not candidates:
            return None
        if not self.scores.has_model(label):
            return {"id": rules.largest_image(datastore, candidates), "label": label,
                    "reason": "no automatic model for this label yet: the largest unlabelled image"}
        candidates = [i for i in candidates if rules.is_volume(datastore, i)]  # SAMauto segments volumes
        if not candidates:
            return None
        budget = integer(request, "score_budget", 2, 0, 1000)
        scored = {i: s for i in candidates if (s := self.scores.stored(datastore, i, label))}
        missing = sorted((i for i in candidates if i not in scored),
                         key=lambda i: -rules.image_voxels(datastore, i))
        for image_id in missing[:max(budget, 0)]:
            scored[image_id] = self.scores.compute(datastore, image_id, label)
        if not scored:
            return {"id": rules.largest_image(datastore, candidates), "label": label,
                    "reason": "no image scored yet (POST /scoring/ with the model's uncertainty method): the largest unlabelled image"}
        best = max(sorted(scored), key=lambda i: scored[i]["image"])
        return {"id": best, "label": label, "score": scored[best]["image"],
                "scored": len(scored), "unscored": len(candidates) - len(scored),
                "reason": "the unlabelled image where the model's coarse and refined masks disagree most"}


class UncertainSlice(Strategy):
    """In one image (the request's `image`, else the one UncertainImage picks), the slice to label next."""

    def __init__(self, scores: SAMautoScores):
        super().__init__("The slice to label next in an image: where the label's automatic model (SAMauto) is "
                         "least sure; the slice farthest from the labelled ones while nothing is learned")
        self.scores = scores
        self.images = UncertainImage(scores)

    def info(self):
        return {**super().info(), "config": {"label": "", "label_value": "", "image": "", "axis": 2}}

    def __call__(self, request, datastore):
        _refresh(datastore)
        label, value = self.scores.resolve(request, datastore)
        image_id = str(request.get("image") or "").strip()
        if image_id:
            if image_id not in datastore.list_images():
                raise not_found(f"no image {image_id[:80]!r} in the datastore")
        else:
            picked = self.images(request, datastore)
            if not picked:
                return None
            image_id = picked["id"]
        learned_axis = self.scores.meta(label).get("axis") if label else None
        axis = int(learned_axis) if learned_axis is not None else integer(request, "axis", 2, 0, 2)
        labelled = rules.labelled_slices(datastore, image_id, value, axis)
        asked = [k for k in asked_slices(datastore, image_id, label, axis) if k not in labelled]
        answer = {"id": image_id, "axis": axis, "label": label, "labelled_slices": labelled, "asked_before": asked}
        if self.scores.has_model(label):
            entry = self.scores.score(datastore, image_id, label)
            chosen = next_uncertain_slice({int(k): u for k, u in entry["slices"].items()}, labelled + asked)
            if chosen:
                remember_asked(datastore, image_id, label, axis, chosen[0])
                return {**answer, "slice": chosen[0], "score": chosen[1],
                        "reason": "the slice where the model's coarse and refined masks disagree most"}
        volume = load_image(datastore.get_image_uri(image_id)).array[0].numpy()
        if volume.ndim != 3:
            raise bad_request(f"{image_id!r} is a 2D image: there is no slice to choose")
        k = rules.widest_spread_slice(labelled + asked, rules.content_slices(volume, axis))
        remember_asked(datastore, image_id, label, axis, k)
        return {**answer, "slice": k, "reason": "the slice farthest from the labelled ones"
                + ("" if self.scores.has_model(label) else " (no automatic model for this label yet)")}


def asked_slices(datastore, image_id: str, label: str | None, axis: int) -> list[int]:
    """The slices Next Sample handed out before for this label and axis (kept in the image info, `asked.<label>`):
    a saved final label cannot say "not here", so a slice handed out and left unlabelled is not handed out again."""
    entry = (datastore.get_image_info(image_id) or {}).get(ASKED_KEY, {}).get(label or "", {})
    return [int(k) for k in entry.get(str(axis), [])]


def remember_asked(datastore, image_id: str, label: str | None, axis: int, k: int) -> None:
    asked = dict((datastore.get_image_info(image_id) or {}).get(ASKED_KEY, {}))
    per_axis = dict(asked.get(label or "", {}))
    per_axis[str(axis)] = sorted(set(per_axis.get(str(axis), [])) | {int(k)})
    asked[label or ""] = per_axis
    datastore.update_image_info(image_id, {ASKED_KEY: asked})


class UncertaintyScoring(ScoringMethod):
    """Scores every unlabelled image for each learned label (or the request's `label`) with its current model."""

    def __init__(self, scores: SAMautoScores):
        super().__init__("Uncertainty of each label's automatic model (SAMauto) on the unlabelled images, kept in "
                         "the image info for the SAMauto strategies")
        self.scores = scores

    def __call__(self, request, datastore):
        labels = [request["label"]] if request.get("label") else self.scores.learned()
        done = {}
        for label in labels:
            if not self.scores.has_model(label):
                raise not_found(f"no automatic model for label {label!r}: train it first")
            _, value = self.scores.resolve({"label": label}, datastore)
            images = [i for i in rules.unlabelled_images(datastore, value) if rules.is_volume(datastore, i)]
            for n, image_id in enumerate(images, 1):
                entry = self.scores.score(datastore, image_id, label)
                logger.info(f"scoring {label!r}: {n}/{len(images)} images ({image_id}: {entry['image']})")
            done[label] = len(images)
        return {"scored": done}
