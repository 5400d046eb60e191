"""MSA adapter training as a MONAI Label train task: `POST /train/<model>_msa` with {"label": "Putamen_L"}.

What a run does, in the subprocess MONAI Label starts for training:
1. Plans slices from the datastore's final labels holding the label (its voxel value from the request's
   `label_value`, else from the names a client saved): `validation_slices` of them, evenly spread, are held out,
   with `gap` slices on each side left out of training too (neighbouring 1 mm slices are near copies); the rest
   train (`slices`: all, or at most N evenly spread).
2. Builds the adapted model (MSA adapters on the frozen backbone), runs the frozen part of the encoder once per
   training slice (or stack of slices, for the depth branch), then trains with MONAI's ignite SupervisedTrainer:
   one iteration is one batch of slices with simulated prompts (random click or box, then corrective clicks).
   `GET /train/` and `/info` (train_stats) show the epoch, step and loss.
3. Validates on the held-out slices (one click; box then corrective clicks) for the adapted and the frozen model.
   With too few labelled slices to hold any out, it validates leave-one-slice-out: adapters are trained again
   without each training slice (and its `gap` neighbours), from the frozen features already computed, for at most
   FOLD_EPOCHS epochs, and score that slice. The infer task's `auto` answers each kind of prompt with whichever
   model scored better.
4. Saves the adapter (only the trained tensors) and what was learned to the per-label store, atomically: the
   infer task serves it at the next click. A failed or stopped run leaves the store as it was.
"""

from __future__ import annotations

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
from lib.models.sam.adapters import AdapterSettings, adapter_state, parameter_counts
from lib.core.images import load_image
from lib.core.stores import LabelStore
from lib.core.training import (AnnotatedSlice, LabelTrainTask, TrainingRequestError, count_labelled_slices,
                               evenly_spread, foreground_slices, held_out_record, int_field,
                               labelled_cases, labelled_volumes, leave_one_out_record, no_validation_record,
                               number_field)
from lib.msa.learner import AdapterLearner, AdapterTrainingSettings, msa_auto_choice
from lib.core.losses import segmentation_loss

logger = logging.getLogger(__name__)

MAX_DEPTH = 9
# Epochs of each leave-one-slice-out fold (the run's own when fewer): a fold retrains every adapter, so at the default
# 20 epochs six folds would cost six runs. Fewer epochs understate the adapter (the putamen's held-out click: 0.69
# after 10 epochs, 0.87 after 20), which the validation record says; `auto` then leans to the frozen model.
FOLD_EPOCHS = 10


def plan_adapter_slices(cases: list[tuple[str, str]], value: int, axis: int, count: int | None, validation: int,
                        gap: int) -> list[AnnotatedSlice]:
    """Training and held-out slices (see the module docstring) over (image, label) pairs of one kind (2D or 3D:
    the first image holding the label decides; the other kind holds other things under the same value)."""
    candidates: list[AnnotatedSlice] = []
    for image_path, label_path, mask, is_2d in labelled_volumes(cases, value):
        if is_2d:
            candidates.append(AnnotatedSlice(image_path, label_path, None, None, "train"))
        else:
            candidates += [AnnotatedSlice(image_path, label_path, axis, k, "train")
                           for k in foreground_slices(mask, axis)]
    if not candidates:
        return []
    held = set()
    if validation and len(candidates) > validation:
        held = set(np.linspace(0, len(candidates) - 1, validation + 2)[1:-1].round().astype(int).tolist())
    plan = []
    for i, item in enumerate(candidates):
        if i in held:
            plan.append(AnnotatedSlice(item.image, item.label, item.axis, item.index, "validation"))
        elif not any(abs(i - h) <= gap and candidates[h].image == item.image and item.axis is not None
                     for h in held):
            plan.append(item)
    if count is not None:
        keep = set(evenly_spread([p for p in plan if p.role == "train"], count))
        plan = [p for p in plan if p.role == "validation" or p in keep]
    return plan


class MSATrainTask(LabelTrainTask):
    method = "MSA"
    running_statuses = ("preparing", "training", "validating")

    def __init__(self, model_dir: str, model_factory, store: LabelStore, device=None, modality: str | None = None,
                 ct_window=None, predictor_settings: PredictorSettings | None = None,
                 description: str = "MSA: train small adapters in the frozen model for one label from saved labels",
                 encoder_runtime: str = "eager", runtime_cache_dir: str | None = None):
        adapters, training = AdapterSettings(), AdapterTrainingSettings()
        config = {"label": "", "label_value": "", "images": [], "axis": 2, "slices": "all", "validation_slices": 6,
                  "gap": 1, **{k: v for k, v in asdict(training).items() if k != "box_jitter"},
                  **{k: v for k, v in asdict(adapters).items() if k != "depth_branch"}}
        super().__init__(model_dir, description, config, model_factory, store, device, modality, ct_window,
                         predictor_settings, encoder_runtime, runtime_cache_dir)

    # -- request -> plan ---------------------------------------------------------------------------------------
    def settings_from(self, request: dict) -> tuple[AdapterSettings, AdapterTrainingSettings]:
        try:
            depth = int_field(request, "depth", 1, MAX_DEPTH)
            adapters = AdapterSettings.from_dict({**request, "depth_branch": depth > 1,
                                                  "bottleneck_ratio": number_field(request, "bottleneck_ratio", 0.0, 4.0),
                                                  "mlp_scale": number_field(request, "mlp_scale", 0.0, 10.0),
                                                  "decoder_adapters": parse_flag(request["decoder_adapters"]),
                                                  "train_decoder_tail": parse_flag(request["train_decoder_tail"])})
            training = AdapterTrainingSettings(
                epochs=int_field(request, "epochs", 1, 1000), batch_size=int_field(request, "batch_size", 1, 64),
                learning_rate=number_field(request, "learning_rate", 0.0, 1.0),
                tail_learning_rate=number_field(request, "tail_learning_rate", 0.0, 1.0),
                weight_decay=number_field(request, "weight_decay", 0.0, 10.0),
                box_fraction=number_field(request, "box_fraction", 0.0, 1.0),
                max_clicks=int_field(request, "max_clicks", 1, 20), depth=depth,
                seed=int_field(request, "seed", 0, 2 ** 31))
        except (TypeError, ValueError) as e:
            raise TrainingRequestError(str(e)) from e
        return adapters, training

    def pre_process(self, request, datastore):
        adapters, training = self.settings_from(request)
        name, value, cases = labelled_cases(request, datastore)
        axis = int_field(request, "axis", 0, 2)
        count = None if str(request.get("slices", "all")).lower() == "all" else int_field(request, "slices", 1, 10000)
        plan = plan_adapter_slices(cases, value, axis, count, int_field(request, "validation_slices", 0, 100),
                                   int_field(request, "gap", 0, 20))
        if not any(p.role == "train" for p in plan):
            raise TrainingRequestError(f"no final label has voxels of {name!r} (value {value})")
        request.update(label=name, label_value=value, max_epochs=training.epochs, adapters=asdict(adapters),
                       training=asdict(training),
                       **count_labelled_slices(cases, value, axis))
        logger.info(f"MSA {name!r} (value {value}): {sum(p.role == 'train' for p in plan)} training slices, "
                    f"{sum(p.role == 'validation' for p in plan)} held out")
        return [asdict(p) for p in plan]

    # -- BasicTrainTask hooks ----------------------------------------------------------------------------------
    def network(self, context: Context):
        start = time.perf_counter()
        request = context.request
        training = AdapterTrainingSettings(**{**request["training"], "box_jitter": tuple(request["training"]["box_jitter"])})
        learner = AdapterLearner(self.model_factory(context.device).eval(), context.device,
                                 AdapterSettings(**request["adapters"]), training)
        value, total = request["label_value"], len(context.train_datalist)
        for n, plan in enumerate(context.train_datalist):
            images, masks = zip(*(self.annotated_slice_at(plan["image"], plan["label"], plan["axis"], k, value)
                                  for k in self.stack_indices(plan, training.depth)))
            learner.add_stack(list(images), list(masks))
            if n == 0 or (n + 1) % 5 == 0 or n + 1 == total:
                self._write_stats({"status": "preparing", "label": request["label"], "slices_ready": n + 1,
                                   "slices": total, "elapsed_s": round(time.perf_counter() - start, 1)})
        context.learner = learner
        context.prepare_seconds = time.perf_counter() - start
        return learner.model

    def stack_indices(self, plan: dict, depth: int) -> list[int | None]:
        """The slices of the stack centred on a planned slice (clamped to the volume); [None] for a 2D image."""
        if plan["axis"] is None:
            return [None] * depth
        image, _ = self._volumes.get_or_compute(plan["image"], lambda: load_image(plan["image"]))
        size = image.spatial_shape[plan["axis"]]
        first = min(max(plan["index"] - depth // 2, 0), max(size - depth, 0))
        return [min(first + d, size - 1) for d in range(depth)]

    def optimizer(self, context: Context):
        return context.learner.optimizer()

    def loss_function(self, context: Context):
        return segmentation_loss

    def _create_trainer(self, context: Context):
        learner: AdapterLearner = context.learner
        settings = learner.settings
        rng = np.random.default_rng(settings.seed)
        torch.manual_seed(settings.seed)
        batches = torch.utils.data.DataLoader(list(range(len(learner.stacks))), batch_size=settings.batch_size,
                                              shuffle=True, collate_fn=list,
                                              generator=torch.Generator().manual_seed(settings.seed))

        def one_step(engine, batch):
            return {"loss": learner.step(engine.optimizer, [learner.stacks[i] for i in batch], rng)}

        trainer = SupervisedTrainer(device=context.device, max_epochs=settings.epochs, train_data_loader=batches,
                                    network=context.network, optimizer=context.optimizer,
                                    loss_function=self.loss_function(context), iteration_update=one_step, amp=False,
                                    decollate=False)
        context.start_train = time.time()
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: self._progress(context, engine))
        trainer.add_event_handler(Events.COMPLETED, lambda engine: self._finish(context, engine))
        return trainer

    # -- progress, validation, publishing ----------------------------------------------------------------------
    def _progress(self, context: Context, engine) -> None:
        loss = float(engine.state.output["loss"])
        context.losses = getattr(context, "losses", []) + [loss]
        steps = engine.state.epoch_length
        step = (engine.state.epoch - 1) * steps + (engine.state.iteration - 1) % steps + 1
        total = engine.state.max_epochs * steps
        if engine.state.iteration % steps == 0:
            logger.info(f"MSA {context.request['label']!r}: epoch {engine.state.epoch}/{engine.state.max_epochs}, "
                        f"loss {np.mean(context.losses[-steps:]):.4f}")
        self._write_stats({"status": "training", "label": context.request["label"], "epoch": engine.state.epoch,
                           "epochs": engine.state.max_epochs, "step": step, "total_steps": total,
                           "loss": round(loss, 5), "elapsed_s": round(time.time() - context.start_ts, 1)})

    def _finish(self, context: Context, engine) -> None:
        request, learner = context.request, context.learner
        train_seconds = time.time() - context.start_train
        self._write_stats({"status": "validating", "label": request["label"],
                           "elapsed_s": round(time.time() - context.start_ts, 1)})
        validation = self.validate(context)
        state = adapter_state(learner.model)
        counts = parameter_counts(learner.model)
        info = {
            "model": request.get("model"), "label_value": request["label_value"], "method": "MSA adapters",
            "adapters": request["adapters"], "training": request["training"],
            "parameters": counts, "file_bytes": int(sum(v.numel() * v.element_size() for v in state.values())),
            "images": sorted({os.path.basename(p["image"]) for p in context.train_datalist}),
            "num_slices": len(context.train_datalist), "epochs": learner.settings.epochs,
            "slices": [_where(p) for p in context.train_datalist],
            "held_out": [_where(p) for p in context.datalist if p["role"] == "validation"],
            "final_loss": round(float(np.mean(context.losses[-engine.state.epoch_length:])), 5),
            "prepare_seconds": round(context.prepare_seconds, 1), "train_seconds": round(train_seconds, 1),
            "seconds_per_epoch": round(train_seconds / learner.settings.epochs, 2),
            "validation": validation, "auto_choice": msa_auto_choice(validation),
            "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "retrain": self.retrain_info(request),
        }
        self.store.save(request["label"], state, info)
        self._write_stats({"status": "done", "label": request["label"],
                           "elapsed_s": round(time.time() - context.start_ts, 1), **info})
        logger.info(f"MSA {request['label']!r} published: validation {json.dumps(validation)}")

    def validate(self, context: Context) -> dict:
        """Dice on the held-out labelled slices: the adapted model (prompts straight to it) against the frozen
        one as the interactive task serves it (its click handling included); with none held out,
        leave-one-slice-out over the training slices."""
        held_out = [p for p in context.datalist if p["role"] == "validation"]
        if held_out:
            slices = [self.validation_slice(plan, context.request["label_value"]) for plan in held_out]
            return held_out_record(self.score(context, context.learner.model, slices, seed=0))
        return self.leave_one_slice_out(context)

    def leave_one_slice_out(self, context: Context) -> dict:
        """Too few labelled slices to hold any out: for each training slice (up to `validation_slices`, evenly
        spread), adapters trained on the others, less the slice's `gap` neighbours on each side (near copies of
        it), score it. Each fold reuses the frozen-part features computed for training and trains a fresh adapter
        with the run's settings, for at most FOLD_EPOCHS epochs."""
        request, learner, plans = context.request, context.learner, context.train_datalist
        gap = int(request.get("gap", 1))
        settings = replace(learner.settings, epochs=min(learner.settings.epochs, FOLD_EPOCHS))
        left_out_slices = evenly_spread(list(range(len(plans))), int(request.get("validation_slices", 6)))
        if not left_out_slices:
            return no_validation_record("validation_slices is 0: not validated")
        folds = []
        for left_out in left_out_slices:
            training = [i for i, plan in enumerate(plans)
                        if i != left_out and not _neighbours(plan, plans[left_out], gap)]
            if training:
                folds.append((left_out, training))
        if not folds:
            return no_validation_record("every labelled slice was used for training and there are too few to train "
                                        f"without one (and its {gap} neighbours on each side): label more slices to "
                                        "get a validation Dice")
        records = []
        for n, (left_out, training) in enumerate(folds):
            self._write_stats({"status": "validating", "label": request["label"], "fold": n + 1, "folds": len(folds),
                               "elapsed_s": round(time.time() - context.start_ts, 1)})
            torch.manual_seed(settings.seed)  # the fresh adapters' initial weights
            fold = AdapterLearner(learner.base, context.device, learner.adapters, settings)
            fold.stacks = [learner.stacks[i] for i in training]
            fold.train()
            plan = plans[left_out]
            slices = [self.validation_slice(plan, request["label_value"])]
            records.append({"slice": _where(plan), "trained_on": len(training),
                             **self.score(context, fold.model, slices, seed=left_out)})
            logger.info(f"MSA {request['label']!r}: fold {n + 1}/{len(folds)} (without slice {plan['index']}): "
                        f"{json.dumps(records[-1])}")
        return leave_one_out_record(
            records, ("adapted", "frozen"), fold_epochs=settings.epochs, epochs=learner.settings.epochs, gap=gap,
            note=f"too few labelled slices to hold any out: each fold trained adapters without one training slice "
                 f"and its {gap} neighbours on each side, for {settings.epochs} of the run's "
                 f"{learner.settings.epochs} epochs, and scored that slice")

    def score(self, context: Context, adapted_model, slices: list[tuple], seed: int) -> dict:
        """validate_prompts for an adapted model (prompts straight to it, on whole slices: it was trained on them)
        and for the frozen model as the interactive task serves it."""
        result = {}
        adapted = PredictorSettings(**{**self.predictor_settings.__dict__, "zoom": False})
        for name, model, direct, settings in (("adapted", adapted_model, True, adapted),
                                              ("frozen", context.learner.base, False, self.predictor_settings)):
            predictor = PromptPredictor(model, context.device, LRUCache(2 * len(slices)), ObjectMemory(), settings)
            predict = lambda slice_image, prompt, key: predictor.predict(slice_image, prompt, key, direct=direct)[0]
            result[name] = validate_prompts(predict, slices, np.random.default_rng(seed))
        return result


def _neighbours(plan: dict, other: dict, gap: int) -> bool:
    """Whether two planned slices are within `gap` slices of each other in the same volume."""
    return (plan["image"] == other["image"] and plan["axis"] is not None and plan["axis"] == other["axis"]
            and abs(plan["index"] - other["index"]) <= gap)


def _where(plan: dict) -> dict:
    return {"image": os.path.basename(plan["image"]), "axis": plan["axis"], "index": plan["index"]}
