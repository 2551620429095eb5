"""The Ray Data plan of the label stage, in one place: read → prepare → teacher pool → write.

CPU steps run as tasks; the teacher runs as an actor pool that Ray Data grows from `concurrency[0]` to
`concurrency[1]` while rows are waiting, each actor reserving the configured CPUs/GPUs. In reference mode
there is no teacher: the references become one-hot labels in a CPU task.
"""
from __future__ import annotations

import ray

from pipeline.config import LabelStage
from pipeline.label.prepare import PrepareSpec, prepare_batch
from pipeline.label.reader import CorpusDatasource
from pipeline.label.teacher import TeacherLabeler, TeacherSpec, reference_labels
from pipeline.label.writer import write_batch


def build_dataset(stage: LabelStage, prep: PrepareSpec, teacher: TeacherSpec, ledger) -> "ray.data.Dataset":
    lab = stage.label
    ds = ray.data.read_datasource(CorpusDatasource(stage.data.paths))
    ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": prep, "ledger": ledger}, batch_format="pyarrow",
                        batch_size=lab.prepare_batch_size, num_cpus=0.5)
    if lab.mode == "reference":
        ds = ds.map_batches(reference_labels, fn_kwargs={"k": lab.k}, batch_format="pyarrow",
                            batch_size=lab.batch_size, num_cpus=0.5)
    else:
        ds = ds.map_batches(
            TeacherLabeler, fn_constructor_kwargs={"spec": teacher}, batch_format="pyarrow", batch_size=lab.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=lab.concurrency[0], max_size=lab.concurrency[1]),
            num_cpus=lab.num_cpus_per_actor, num_gpus=lab.num_gpus_per_actor,
        )
    return ds.map_batches(write_batch, fn_kwargs={"labels_dir": stage.paths.labels_dir,
                                                  "rejected_dir": stage.paths.rejected_dir},
                          batch_format="pyarrow", batch_size=None, num_cpus=0.25)
