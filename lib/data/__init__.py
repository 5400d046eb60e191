"""Training data sets built from the sample data and registry packages (see `oneprompt_tasks`)."""

from .oneprompt_tasks import (DatasetBuild, DatasetSpec, Sample, Task, build_dataset, build_samples, dataset_catalogue,
                              iter_shard_samples, load_shard, save_shard, slicing_axes, task_catalogue, task_role)

__all__ = ["DatasetBuild", "DatasetSpec", "Sample", "Task", "build_dataset", "build_samples", "dataset_catalogue",
           "iter_shard_samples", "load_shard", "save_shard", "slicing_axes", "task_catalogue", "task_role"]
