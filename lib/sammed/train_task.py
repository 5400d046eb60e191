"""SAMassist as a MONAI Label train task: `POST /train/<model>` with {"label": "Thalamus_L", "slices": 2}.

What a run does, in the subprocess MONAI Label starts for training:
1. Finds the annotated slices: the datastore's final labels that hold the label (its voxel value comes from the
   request's `label_value`, else from the names a client saved with the label). When more slices are labelled than
   asked for, they are drawn as the paper does (normal around the median foreground slice); a label drawn on just
   those slices is used as it is.
2. Encodes those slices once with the frozen image encoder, then trains a copy of the prompt encoder with MONAI's
   ignite SupervisedTrainer: one epoch is one optimisation step over all annotated slices (the paper's iteration),
   so `GET /train/` and `/info` (train_stats) follow the run step by step.
3. Validates on labelled slices it did not train on (one click; box then corrective clicks), for the learned prompt
   encoder and for what the infer task answers without it (the click model or the box search for clicks, the
   vanilla encoder for boxes), through the same predictor the infer task uses. When every labelled slice trained,
   it validates leave-one-slice-out: the prompt encoder is learned again without each training slice, which it
   then scores. The infer task's `auto` answers each kind of prompt with whichever scored better.
4. Saves the learned encoder and what was learned to the per-label store, atomically: the infer task serves it at
   the next click. A failed or stopped run leaves the store as it was, and says why in train_stats.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monailabel.tasks.train.basic_train import Context

from lib.core.evaluation import validate_prompts
from lib.core.cache import LRUCache
from lib.core.predictor import ObjectMemory, PredictorSettings, PromptPredictor
from lib.core.requests import parse_flag
from lib.core.stores import LabelStore
from lib.core.training import (AnnotatedSlice, LabelTrainTask, TrainingRequestError, count_labelled_slices,
                               evenly_spread, foreground_slices, held_out_record, int_field, labelled_cases,
                               labelled_volumes, leave_one_out_record, no_validation_record, number_field)
from lib.core.images import image_kind, load_image
from lib.sammed.click_model import click_model_encoder, click_model_path_for, read_click_model, served_image_kinds
from lib.sammed.sapnet import SAPNetLearner
from lib.core.losses import segmentation_loss
from lib.sammed.samassist import (PromptEncoderLearner, PromptLearningSettings, samassist_auto_choice,
                                  select_training_slices, state_dict_of)

logger = logging.getLogger(__name__)

MAX_SLICES = 20  # the method is for a few slices; more only slows the run down


def annotated_masks(plans: list[dict], slices: list) -> dict:
    """The training slices' masks, by image file name then slice index: SAMauto keeps them as they are and anchors
    its choice of 3D components on them when it segments the image they came from."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for plan, item in zip(plans, slices):
        out.setdefault(os.path.basename(plan["image"]), {})[str(plan["index"])] = \
            torch.as_tensor(np.asarray(item.mask, dtype=np.uint8))
    return out


def plan_slices(cases: list[tuple[str, str]], value: int, axis: int, count: int, validation: int,
                rng: np.random.Generator) -> list[AnnotatedSlice]:
    """Training and validation slices over (image, label) pairs: `count` training slices in all, from the first
    labelled volumes; up to `validation` other labelled slices, evenly spread, to validate on."""
    planned: list[AnnotatedSlice] = []
    for image_path, label_path, volume, is_2d in labelled_volumes(cases, value):
        needed = count - sum(p.role == "train" for p in planned)
        if is_2d:
            planned.append(AnnotatedSlice(image_path, label_path, None, None, "train" if needed else "validation"))
            continue
        train = select_training_slices(volume, axis, needed, rng) if needed else []
        planned += [AnnotatedSlice(image_path, label_path, axis, k, "train") for k in train]
        planned += [AnnotatedSlice(image_path, label_path, axis, k, "validation")
                    for k in foreground_slices(volume, axis) if k not in train]
    keep = set(evenly_spread([p for p in planned if p.role == "validation"], validation))
    planned = [p for p in planned if p.role == "train" or p in keep]
    return planned


class SAMassistTrainTask(LabelTrainTask):
    method = "SAMassist"
    running_statuses = ("training", "validating", "learning SAMauto")

    def __init__(self, model_dir: str, model_factory, store: LabelStore, device=None, modality: str | None = None,
                 ct_window=None, predictor_settings: PredictorSettings | None = None,
                 description: str = "SAMassist: learn this model's prompt encoder for one label from 2-5 labelled slices",
                 encoder_runtime: str = "eager", runtime_cache_dir: str | None = None):
        defaults = PromptLearningSettings()
        config = {"label": "", "label_value": "", "slices": 2, "axis": 2, "prompt": defaults.prompt,
                  "scheme": defaults.scheme, "iterations": defaults.iterations,
                  "learning_rate": defaults.learning_rate, "validation_slices": 6, "seed": defaults.seed,
                  "auto": True, "images": []}
        super().__init__(model_dir, description, config, model_factory, store, device, modality, ct_window,
                         predictor_settings, encoder_runtime, runtime_cache_dir)
        # The app's settings (from_settings), which say whether the served model answers untaught clicks with the
        # click model (the validation's baseline for clicks); none given: the defaults.
        self.served_settings: dict = {}

    @classmethod
    def from_settings(cls, model_dir: str, model_factory, store: LabelStore, settings: dict,
                      runtime_cache_dir: str | None = None):
        task = super().from_settings(model_dir, model_factory, store, settings, runtime_cache_dir)
        task.served_settings = settings
        return task

    def retrain_params(self, retrain: dict, labelled_slices: int) -> dict:
        """New labels are for learning: a retrain trains on every labelled slice but one (up to MAX_SLICES), the one
        left over validates; never on fewer slices than the last run."""
        params = dict(retrain["params"])
        params["slices"] = min(MAX_SLICES, max(int(params.get("slices") or 2), labelled_slices - 1))
        return params

    # -- request -> plan ---------------------------------------------------------------------------------------
    def learning_settings(self, request: dict) -> PromptLearningSettings:
        try:
            return replace(PromptLearningSettings(), prompt=str(request["prompt"]), scheme=str(request["scheme"]),
                           iterations=int_field(request, "iterations", 1, 10000),
                           learning_rate=number_field(request, "learning_rate", 0.0, 1.0), seed=int_field(request, "seed", 0, 2 ** 31))
        except (TypeError, ValueError) as e:
            raise TrainingRequestError(str(e)) from e

    def pre_process(self, request, datastore):
        """Validate the request and plan the slices; returned as MONAI Label's datalist."""
        settings = self.learning_settings(request)
        name, value, cases = labelled_cases(request, datastore)
        axis = int_field(request, "axis", 0, 2)
        count = int_field(request, "slices", 1, MAX_SLICES)
        plan = plan_slices(cases, value, axis, count, int_field(request, "validation_slices", 0, 100),
                           np.random.default_rng(settings.seed))
        if not any(p.role == "train" for p in plan):
            raise TrainingRequestError(f"no final label has voxels of {name!r} (value {value})")
        request.update(label=name, label_value=value, max_epochs=settings.iterations, learning=asdict(settings),
                       **count_labelled_slices(cases, value, axis))
        logger.info(f"SAMassist {name!r} (value {value}): training on "
                    f"{[(os.path.basename(p.image), p.index) for p in plan if p.role == 'train']}, validating on "
                    f"{sum(p.role == 'validation' for p in plan)} other slices")
        return [asdict(p) for p in plan]

    # -- BasicTrainTask hooks ----------------------------------------------------------------------------------
    def network(self, context: Context):
        start = time.perf_counter()
        model = self.model_factory(context.device).eval()
        context.encode = self.frozen_encoder(model, context.device)
        learner = PromptEncoderLearner(model, context.device, PromptLearningSettings(**context.request["learning"]),
                                       encode=context.encode)
        for n, plan in enumerate(context.train_datalist):
            slice_image, mask = self.annotated_slice(plan, context.request["label_value"])
            learner.add_slice(slice_image, mask)
            logger.info(f"encoded training slice {n + 1}/{len(context.train_datalist)}: "
                        f"{os.path.basename(plan['image'])} index {plan['index']} ({int(mask.sum())} labelled pixels)")
        context.learner = learner
        context.encode_seconds = time.perf_counter() - start
        context.click_model = self.click_model_baseline(context, model)
        return learner.trainable_encoder()

    def click_model_baseline(self, context: Context, model):
        """The click model when the infer task would answer this label's clicks with it (the served model has one,
        and it answers this kind of image), else None (the box search)."""
        state = read_click_model(click_model_path_for(context.request.get("model"), self.served_settings))
        if state is None:
            return None
        plan = context.train_datalist[0]
        image, _ = self._volumes.get_or_compute(plan["image"], lambda: load_image(plan["image"]))
        (modality, _), _ = image.intensity(self.modality, self.ct_window)
        if image_kind(modality, image) not in served_image_kinds(state):
            return None
        return click_model_encoder(model.prompt_encoder, state)

    def optimizer(self, context: Context):
        return context.learner.optimizer(context.network)

    def loss_function(self, context: Context):
        return segmentation_loss

    def _create_trainer(self, context: Context):
        learner: PromptEncoderLearner = context.learner
        settings = learner.settings
        rng = np.random.default_rng(settings.seed)
        torch.manual_seed(settings.seed)
        slices = torch.utils.data.DataLoader(list(range(len(learner.slices))), batch_size=len(learner.slices),
                                             collate_fn=list)

        def one_step(engine, batch):
            return {"loss": learner.step(engine.network, engine.optimizer, [learner.slices[i] for i in batch], rng)}

        trainer = SupervisedTrainer(device=context.device, max_epochs=settings.iterations, train_data_loader=slices,
                                    network=context.network, optimizer=context.optimizer,
                                    loss_function=self.loss_function(context), iteration_update=one_step, amp=False,
                                    decollate=False)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self._progress(context, engine))
        trainer.add_event_handler(Events.COMPLETED, lambda engine: self._finish(context, engine))
        return trainer

    # -- progress, validation, publishing ----------------------------------------------------------------------
    def _progress(self, context: Context, engine) -> None:
        loss = float(engine.state.output["loss"])
        context.losses = getattr(context, "losses", []) + [loss]
        step, total = engine.state.epoch, engine.state.max_epochs
        if step == 1 or step == total or step % 10 == 0:
            logger.info(f"SAMassist {context.request['label']!r}: step {step}/{total}, loss {loss:.4f}")
        self._write_stats({"status": "training", "label": context.request["label"], "step": step,
                           "total_steps": total, "loss": round(loss, 5),
                           "elapsed_s": round(time.time() - context.start_ts, 1)})

    def _finish(self, context: Context, engine) -> None:
        request, learner = context.request, context.learner
        learned_state = state_dict_of(context.network)
        train_seconds = time.time() - context.start_ts
        self._write_stats({"status": "validating", "label": request["label"],
                           "elapsed_s": round(train_seconds, 1)})
        learned = copy.deepcopy(learner.model.prompt_encoder)
        learned.load_state_dict(learned_state)
        validation = self.validate(context, learned.eval())
        extra, auto = {}, None
        if parse_flag(context.request.get("auto")) and context.train_datalist[0]["axis"] is not None:
            sapnet = self.learn_sapnet(context)
            extra["sapnet"] = sapnet.state_dict
            extra["annotated"] = annotated_masks(context.train_datalist, context.learner.slices)
            auto = {"axis": context.train_datalist[0]["axis"], **sapnet.info()}
            auto.pop("losses")
        info = {
            "model": request.get("model"), "label_value": request["label_value"],
            "prompt": learner.settings.prompt, "scheme": learner.settings.scheme,
            "slices": [{"image": os.path.basename(p["image"]), "axis": p["axis"], "index": p["index"]}
                       for p in context.train_datalist],
            "num_slices": len(context.train_datalist), "iterations": learner.settings.iterations,
            "final_loss": round(context.losses[-1], 5), "train_seconds": round(train_seconds, 1),
            "validation": validation, "auto_choice": samassist_auto_choice(validation), "auto": auto,
            "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "retrain": self.retrain_info(request),
        }
        self.store.save(request["label"], learned_state, info, extra)
        self._write_stats({"status": "done", "label": request["label"], "total_steps": engine.state.max_epochs,
                           "elapsed_s": round(time.time() - context.start_ts, 1), **info})
        logger.info(f"SAMassist {request['label']!r} published: validation {json.dumps(validation)}")

    def learn_sapnet(self, context: Context):
        """SAMauto's SAP-Net, from the same annotated slices and their already computed embeddings."""
        learner = SAPNetLearner(context.learner.model, context.device)
        for item, plan in zip(context.learner.slices, context.train_datalist):
            learner.add_slice(None, item.mask, index=plan["index"], embedding=item.embedding)
        self._write_stats({"status": "learning SAMauto", "label": context.request["label"],
                           "elapsed_s": round(time.time() - context.start_ts, 1)})
        learned = learner.train()
        logger.info(f"SAMauto {context.request['label']!r}: SAP-Net learned in {learned.seconds:.1f}s")
        return learned

    def validate(self, context: Context, learned: torch.nn.Module) -> dict:
        """Dice of the learned prompt encoder and of the baseline (what the infer task answers without it) on
        held-out labelled slices; with none held out, leave-one-slice-out over the training slices."""
        held_out = [p for p in context.datalist if p["role"] == "validation"]
        baseline = {"click": "box_search" if context.click_model is None else "click_model", "box": "vanilla",
                    "box_then_clicks": "vanilla"}
        if held_out:
            slices = [self.validation_slice(plan, context.request["label_value"]) for plan in held_out]
            return held_out_record(self.score(context, learned, slices, seed=0), baseline=baseline)
        return self.leave_one_slice_out(context, baseline)

    def leave_one_slice_out(self, context: Context, baseline: dict) -> dict:
        """Too few labelled slices to hold any out: for each training slice (up to `validation_slices`, evenly
        spread), the prompt encoder learned on the others with the same settings scores it. The embeddings are
        those computed for training; a fold costs one more optimisation run."""
        learner, plans = context.learner, context.train_datalist
        folds = evenly_spread(list(range(len(plans))), int(context.request.get("validation_slices", 6)))
        if not folds:
            return no_validation_record("validation_slices is 0: not validated")
        if len(plans) < 2:
            return no_validation_record("the only labelled slice was used for training: label more slices to get a "
                                        "validation Dice")
        records = []
        for n, left_out in enumerate(folds):
            self._write_stats({"status": "validating", "label": context.request["label"], "fold": n + 1,
                               "folds": len(folds), "elapsed_s": round(time.time() - context.start_ts, 1)})
            fold = PromptEncoderLearner(learner.model, learner.device, learner.settings, encode=learner.encode)
            fold.slices = [item for i, item in enumerate(learner.slices) if i != left_out]
            encoder = copy.deepcopy(learner.model.prompt_encoder)
            encoder.load_state_dict(fold.train().state_dict)
            plan = plans[left_out]
            slices = [self.validation_slice(plan, context.request["label_value"])]
            records.append({"slice": {"image": os.path.basename(plan["image"]), "axis": plan["axis"],
                                      "index": plan["index"]},
                            **self.score(context, encoder.eval(), slices, seed=left_out)})
            logger.info(f"SAMassist {context.request['label']!r}: fold {n + 1}/{len(folds)} (without slice "
                        f"{plan['index']}): {json.dumps(records[-1])}")
        return leave_one_out_record(records, ("learned", "vanilla"), baseline=baseline,
                                    note="too few labelled slices to hold any out: each fold learned the prompt "
                                         "encoder without one training slice, with the same settings, and scored it")

    def score(self, context: Context, learned: torch.nn.Module, slices: list[tuple], seed: int) -> dict:
        """validate_prompts for the learned encoder ("learned") and for the baseline ("vanilla", the key earlier
        records used): the click model (if the served model has one) for clicks alone, the vanilla encoder
        wherever a box is given, as the infer task answers a label without a learned encoder."""
        embeddings = LRUCache(max(2, 2 * len(slices)))  # each slice encoded once, for both runs
        answers = {"learned": lambda prompt: learned,
                   "vanilla": lambda prompt: context.click_model if prompt.box is None else None}
        result = {}
        for name, encoder_for in answers.items():
            predictor = PromptPredictor(context.learner.model, context.device, embeddings, ObjectMemory(),
                                        self.predictor_settings, encode=context.encode)
            predict = lambda slice_image, prompt, key: predictor.predict(slice_image, prompt, key,
                                                                         encoder_for(prompt))[0]
            result[name] = validate_prompts(predict, slices, np.random.default_rng(seed))
        return result
