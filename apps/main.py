"""The MONAI Label app: wiring only. Configs are discovered in lib/configs (every TaskConfig subclass there) and
share the served models; models, transforms and tasks live in lib/ at the repository root."""

import logging
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # MONAI Label puts only this folder on the path; lib/ is beside it
    sys.path.insert(0, REPO_ROOT)

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.config import TaskConfig  # noqa: E402
from monailabel.utils.others.class_utils import get_class_names  # noqa: E402

import lib.configs  # noqa: E402
from lib.configs.backbones import ServedModels  # noqa: E402
from lib.core.errors import bad_request  # noqa: E402
from lib.core.settings import load_settings, resolve_path  # noqa: E402
from lib.server.datastore import GuardedLocalDatastore  # noqa: E402
from lib.server.inference import server_stats  # noqa: E402
from lib.server.retraining import RetrainTriggers  # noqa: E402

logger = logging.getLogger(__name__)


def discovered_configs() -> dict[str, type]:
    """{config name (its module's name): class} for every TaskConfig in lib/configs, as MONAI Label's sample apps
    find theirs."""
    configs = {}
    for path in get_class_names(lib.configs, "TaskConfig"):
        module, _, cls = path.rpartition(".")
        configs[module.rpartition(".")[2]] = getattr(sys.modules[module], cls)
    return dict(sorted(configs.items()))


class PromptableSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        settings = load_settings(conf)
        self.settings = settings
        model_dir = resolve_path(settings["models_dir"], app_dir)
        available = discovered_configs()
        chosen = [m.strip() for m in str(conf.get("models") or "all").split(",") if m.strip()]
        if chosen == ["all"]:
            chosen = list(available)
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise bad_request(f"--conf models: unknown {unknown}; available: {', '.join(available)}")
        served = ServedModels(model_dir, settings)  # one copy of each SAM-family model, shared by every config
        self.served = served
        self.task_configs: dict[str, TaskConfig] = {}
        for name in chosen:
            config = available[name]()
            config.init(name, model_dir, conf, None, served=served)
            self.task_configs[name] = config
        logger.info(f"configs: {', '.join(self.task_configs)}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Promptable medical SAM",
                         description="Click, box or prompt medical images with SAM-family foundation models",
                         version="0.1.0")
        # The server runs each request as a job on its own workers (lib/server/jobs.py), where its progress and
        # cancellation live; MONAI Label's extra hop to another thread would lose them.
        self._infers_threadpool = None
        # MONAI Label runs every scoring method after each saved label and Next Sample; ours run whole-volume models,
        # so they run when asked (POST /scoring/...), and a Next Sample scores what it needs itself.
        self._auto_update_scoring = False
        self.retraining = RetrainTriggers(lambda: self._trainers, self.datastore, lambda: list(self._scoring_methods),
                                          settings["retrain_after_new_labels"])

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            from lib.server.dicomweb import guarded  # imported on use: SimpleITK and pydicom-seg come with it

            return guarded(super().init_datastore(), modalities=self.settings["dicomweb_modalities"],
                           cache_mb=self.settings["dicomweb_cache_mb"],
                           revalidate_s=self.settings["dicomweb_revalidate_s"])
        from monailabel.config import settings

        return GuardedLocalDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                     auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                     read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                     max_image_voxels=int(float(self.settings["max_image_mvoxels"]) * 1e6) or None)

    def _download_dcmqi_tools(self):
        # MONAI Label downloads dcmqi here, which fails offline: the pinned dcmqi wheel ships its SEG writer.
        from lib.server.dicomweb import use_packaged_dcmqi

        use_packaged_dcmqi()

    def info(self):
        meta = super().info()
        meta["caches"] = self.served.cache_stats()
        meta["runtimes"] = self.served.runtimes()
        meta["server"] = server_stats()
        meta["active_learning"] = self.retraining.status()
        return meta

    def on_save_label(self, image_id, label_id):
        self.retraining.label_saved(image_id)
        return super().on_save_label(image_id, label_id)

    def init_infers(self):
        infers = {}
        for config in self.task_configs.values():
            infers.update(config.infer())
        return infers

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        strategies = {"random": Random(), "first": First()}
        for config in self.task_configs.values():
            strategies.update(config.strategy() or {})
        return strategies

    def init_scoring_methods(self):
        methods = {}
        for config in self.task_configs.values():
            methods.update(config.scoring_method() or {})
        return methods

    def init_trainers(self):
        trainers = {}
        for config in self.task_configs.values():
            trainers.update(config.trainer() or {})
        return trainers

    def infer(self, request, datastore=None):
        image = request.get("image")
        task = self._infers.get(request.get("model"))
        resolve = getattr(task, "resolve_datastore_references", None)
        if resolve and isinstance(image, str):  # e.g. One-Prompt's SegLab/doodle prompts name a label tag
            resolve(request, datastore or self.datastore(), bool(self.settings.get("allow_server_paths")))
        return super().infer(request, datastore)
