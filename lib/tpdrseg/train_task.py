"""TP-DRSeg training on the datastore's lesion labels: `POST /train/tpdrseg` with {"steps": 200, ...}.

Which images: 2D colour fundus photographs whose final label is a lesion map in the classes of configs/lesions.yaml
(values 0 and 1 MA, 2 HE, 3 EX, 4 SE; at least one lesion pixel; lesions on at most a quarter of the image: a label
covering more is not a lesion map, e.g. sample-data's retina field-of-view mask). `images` (a list of image ids)
restricts the choice; images that do not qualify are listed with the reason in train_stats.

What a run does, in the subprocess MONAI Label starts for training:
1. Reads the images as the infer task does and lib/tpdrseg/training.py trains on them (RGB 0-255 -> [0, 1], padded
   to a square, area-resized to 256 px; masks max-pooled: lib/tpdrseg/preprocessing.py). With `validation_images`
   (default: a fifth of the images when there are at least 2, else none) images held out, evenly spread; with none,
   the metrics are on the training images and say so.
2. Starts from the weights the infer task serves (`init: "served"`, default; a fresh model when there are none) or
   from scratch (`init: "scratch"`), and runs lib/tpdrseg/training.py's training step (AdamW, BCE + IoU, prior
   loss, flips, `classes_per_image` random classes per image) under MONAI's ignite SupervisedTrainer, one
   iteration per step. `GET /train/` and `/info` (train_stats) show the step and loss.
3. Validates (per-class Dice at 0.5, AUC-ROC, AUC-PR, their means over classes present: lib/tpdrseg/training.py's
   `lesion_metrics`), then writes the weights (<models>/tpdrseg/tpdrseg_trained.pt) and the metrics and run details
   (tpdrseg_trained.json beside it), each atomically. The infer task serves them at its next request. A failed or
   stopped run leaves the served weights as they were.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monailabel.tasks.train.basic_train import Context

from lib.core.images import IMAGE_2D_EXTENSIONS, load_image
from lib.core.requests import parse_flag
from lib.core.training import LabelTrainTask, TrainingRequestError, int_field, number_field
from lib.tpdrseg import training
from lib.tpdrseg.checkpoint import finite, write_weights
from lib.tpdrseg.preprocessing import model_input, model_target
from lib.tpdrseg.served_models import TPDRSegModels

logger = logging.getLogger(__name__)

MAX_LESION_FRACTION = 0.25


class TPDRSegTrainTask(LabelTrainTask):
    method = "TP-DRSeg"
    running_statuses = ("preparing", "training", "validating")

    def __init__(self, model_dir: str, models: TPDRSegModels, device=None,
                 description: str = "TP-DRSeg: train the text-prompted lesion model on labelled fundus images"):
        defaults = training.TrainConfig()
        config = {"steps": 200, "batch_size": defaults.batch_size, "classes_per_image": defaults.classes_per_image,
                  "learning_rate": defaults.lr, "weight_decay": defaults.weight_decay,
                  "prior_loss_weight": defaults.prior_loss_weight, "fg_weight_cap": defaults.fg_weight_cap,
                  "flips": defaults.flips, "seed": defaults.seed,
                  "images": [], "validation_images": "auto", "init": "served", "gradient_checkpointing": False}
        super().__init__(model_dir, description, config, None, None, device)
        self.models = models

    # -- request -> plan ---------------------------------------------------------------------------------------
    def settings_from(self, request: dict) -> dict:
        k = len(self.models.catalogue)
        settings = {"steps": int_field(request, "steps", 1, 1_000_000),
                    "batch_size": int_field(request, "batch_size", 1, 64),
                    "classes_per_image": int_field(request, "classes_per_image", 1, k),
                    "lr": number_field(request, "learning_rate", 0.0, 1.0),
                    "weight_decay": number_field(request, "weight_decay", 0.0, 10.0),
                    "prior_loss_weight": number_field(request, "prior_loss_weight", 0.0, 100.0),
                    "fg_weight_cap": number_field(request, "fg_weight_cap", 0.0, 1000.0),
                    "flips": parse_flag(request["flips"]), "seed": int_field(request, "seed", 0, 2 ** 31),
                    "gradient_checkpointing": parse_flag(request["gradient_checkpointing"])}
        init = str(request.get("init") or "served").lower()
        if init not in ("served", "scratch"):
            raise TrainingRequestError(f"'init' must be served or scratch, got {init!r}")
        settings["init"] = init
        return settings

    def lesion_images(self, request: dict, datastore) -> tuple[list[dict], list[dict]]:
        """([{"image", "label", "id"}] of qualifying images, [{"id", "reason"}] of the others)."""
        image_ids = datastore.get_labeled_images("final")
        wanted = request.get("images") or []
        if isinstance(wanted, str):
            wanted = [wanted]
        unknown = sorted(set(map(str, wanted)) - set(image_ids))
        if unknown:
            raise TrainingRequestError(f"'images' {unknown} are not in the datastore or have no final label")
        if wanted:
            image_ids = [i for i in image_ids if i in set(map(str, wanted))]
        values = {0} | {c.label for c in self.models.catalogue}
        found, skipped = [], []
        for image_id in sorted(image_ids):
            image_path, label_path = datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, "final")
            if not label_path.lower().endswith(IMAGE_2D_EXTENSIONS):
                skipped.append({"id": image_id, "reason": "not a 2D image"})
                continue
            label = load_image(label_path).array[0].numpy().round().astype(np.int64)
            present = set(np.unique(label).tolist())
            if not present <= values:
                skipped.append({"id": image_id, "reason": f"label values {sorted(present - values)[:5]} are not "
                                                          f"lesion classes {sorted(values - {0})}"})
                continue
            fraction = float((label > 0).mean())
            if fraction == 0 or fraction > MAX_LESION_FRACTION:
                skipped.append({"id": image_id, "reason": "no lesion pixel" if fraction == 0 else
                                f"{fraction:.0%} of the image is labelled: not a lesion map"})
                continue
            if not load_image(image_path).is_rgb:
                skipped.append({"id": image_id, "reason": "not a colour (RGB) photograph"})
                continue
            found.append({"id": image_id, "image": image_path, "label": label_path})
        return found, skipped

    def pre_process(self, request, datastore):
        settings = self.settings_from(request)
        found, skipped = self.lesion_images(request, datastore)
        if not found:
            why = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped) or "no labelled image"
            raise TrainingRequestError(f"no datastore image has a fundus lesion label ({why})")
        held = str(request.get("validation_images", "auto")).strip().lower()
        n_val = (len(found) // 5 if len(found) >= 5 else int(len(found) >= 2)) if held in ("auto", "") else \
            int_field(request, "validation_images", 0, len(found) - 1)
        val_idx = set(np.linspace(0, len(found) - 1, n_val + 2)[1:-1].round().astype(int).tolist()) if n_val else set()
        plan = [{**f, "role": "validation" if i in val_idx else "train"} for i, f in enumerate(found)]
        request.update(max_epochs=1, settings=settings, skipped=skipped)
        logger.info(f"TP-DRSeg: {len(found) - len(val_idx)} training and {len(val_idx)} held-out images; "
                    f"skipped {skipped}")
        return plan

    # -- BasicTrainTask hooks ----------------------------------------------------------------------------------
    def network(self, context: Context):
        start = time.perf_counter()
        request, settings = context.request, context.request["settings"]
        self._write_stats({"status": "preparing", "images": len(context.datalist), "skipped": request["skipped"]})
        models = self.models
        initialised_from = None
        if settings["init"] == "served":
            try:
                path, source = models.weights_path("auto")
                model, meta = models.load(path)
                initialised_from = {"path": path, "source": source}
                text_encoder = meta["text_encoder"]
            except Exception as e:  # noqa: BLE001 - no (usable) served weights: a fresh model
                logger.info(f"TP-DRSeg: starting from an untrained model ({e})")
                model, text_encoder = models.build(), "minilm"
        else:
            model, text_encoder = models.build(), "minilm"
        model.gradient_checkpointing = settings["gradient_checkpointing"]
        arrays = {"train": ([], []), "validation": ([], [])}
        for item in context.datalist:
            image = load_image(item["image"])
            _, intensity = image.intensity("RGB")
            x, _ = model_input(image.normalised_slice(None, None, intensity), model.image_size)
            label = load_image(item["label"]).array[0].numpy().round().T  # (X, Y) -> (rows, cols)
            masks = np.stack([label == c.label for c in models.catalogue])
            arrays[item["role"]][0].append(x)
            arrays[item["role"]][1].append(model_target(masks, model.image_size))
        context.data = {role: (torch.stack(xs), torch.stack(ys)) for role, (xs, ys) in arrays.items() if xs}
        context.model, context.text_encoder, context.initialised_from = model, text_encoder, initialised_from
        context.prepare_seconds = time.perf_counter() - start
        return model

    def optimizer(self, context: Context):
        s = context.request["settings"]
        return training.make_optimizer(context.network,
                                       training.TrainConfig(lr=s["lr"], weight_decay=s["weight_decay"]))

    def loss_function(self, context: Context):
        return torch.nn.BCEWithLogitsLoss()  # unused: the step computes the model's own BCE + IoU loss

    def _create_trainer(self, context: Context):
        s = context.request["settings"]
        torch.manual_seed(s["seed"])
        gen = torch.Generator().manual_seed(s["seed"])
        x_train, y_train = context.data["train"]
        steps = torch.utils.data.DataLoader(list(range(s["steps"])), batch_size=1, collate_fn=list)

        def one_step(engine, batch):
            idx = torch.randint(len(x_train), (s["batch_size"],), generator=gen)
            xb, yb = x_train[idx], y_train[idx]
            if s["flips"]:
                xb, yb = training.flip_batch(xb, yb, gen)
            classes = training.sample_classes(len(idx), yb.shape[1], s["classes_per_image"], gen)
            device = context.device
            return training.train_step(context.network, engine.optimizer, xb.to(device), yb.to(device),
                                       classes.to(device), s["prior_loss_weight"], s["fg_weight_cap"])

        trainer = SupervisedTrainer(device=context.device, max_epochs=1, train_data_loader=steps,
                                    network=context.network, optimizer=context.optimizer,
                                    loss_function=self.loss_function(context), iteration_update=one_step, amp=False,
                                    decollate=False)
        context.start_train = time.time()
        context.losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: self._progress(context, engine))
        trainer.add_event_handler(Events.COMPLETED, lambda engine: self._finish(context, engine))
        return trainer

    # -- progress, validation, publishing ----------------------------------------------------------------------
    def _progress(self, context: Context, engine) -> None:
        out = engine.state.output
        context.losses.append(float(out["loss"]))
        step, total = engine.state.iteration, context.request["settings"]["steps"]
        if step % 10 == 0 or step == total:
            logger.info(f"TP-DRSeg step {step}/{total}: loss {np.mean(context.losses[-10:]):.4f}")
        self._write_stats({"status": "training", "step": step, "total_steps": total,
                           "loss": round(float(out["loss"]), 5),
                           **{k: round(float(v), 5) for k, v in out.items() if k in ("bce", "iou", "prior")},
                           "elapsed_s": round(time.time() - context.start_ts, 1)})

    def _finish(self, context: Context, engine) -> None:
        request, s = context.request, context.request["settings"]
        train_seconds = time.time() - context.start_train
        self._write_stats({"status": "validating", "elapsed_s": round(time.time() - context.start_ts, 1)})
        on = "validation" if "validation" in context.data else "train"
        images, masks = context.data[on]
        model = context.network
        metrics = training.lesion_metrics(training.predict(model, images.to(context.device)), masks.numpy(),
                                          model.class_names)
        validation = {"on": "held-out images" if on == "validation" else
                      "the training images (no image held out: label more images for a held-out score)",
                      "images": [d["id"] for d in context.datalist if d["role"] == on],
                      "metrics": metrics, "threshold": 0.5, "resolution": model.image_size}
        info = {"model_name": request.get("model"), "method": "TP-DRSeg",
                "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "steps": s["steps"], "settings": s, "initialised_from": context.initialised_from,
                "images": [d["id"] for d in context.datalist if d["role"] == "train"],
                "held_out": [d["id"] for d in context.datalist if d["role"] == "validation"],
                "skipped": request["skipped"],
                "final_loss": round(float(np.mean(context.losses[-10:])), 5),
                "prepare_seconds": round(context.prepare_seconds, 1), "train_seconds": round(train_seconds, 1),
                "seconds_per_step": round(train_seconds / max(1, s["steps"]), 2), "validation": validation}
        write_weights(self.models.trained, model, context.text_encoder, info)
        done = {k: v for k, v in info.items() if k != "settings"}
        self._write_stats(finite({"status": "done", "elapsed_s": round(time.time() - context.start_ts, 1),
                                  "weights": self.models.trained, **done}))
        logger.info(f"TP-DRSeg weights written to {self.models.trained}: mDice {metrics['mDice']:.3f} on {on}")
