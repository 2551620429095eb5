"""The Ray Data plan of the label stage, in one place: read → the generation processor → write.

The processor (`pipeline.generation.processor`) prepares rows as CPU tasks and runs the teacher as an actor pool
that Ray Data grows from `label.concurrency[0]` to `[1]` while rows wait; in reference mode there is no teacher
and the references become one-hot labels in a CPU task. The writer quarantines refused rows with their reason.
"""
from __future__ import annotations

import ray

from pipeline import storage
from pipeline.config import LabelStage
from pipeline.generation.processor import ProcessorSpec, build_processor, read_corpus
from pipeline.label.writer import write_batch


def processor_spec(stage: LabelStage, prep, teacher) -> ProcessorSpec:
    lab = stage.label
    return ProcessorSpec(prepare=prep, engine=teacher, batch_size=lab.batch_size,
                         prepare_batch_size=lab.prepare_batch_size, concurrency=tuple(lab.concurrency),
                         num_cpus_per_actor=lab.num_cpus_per_actor, num_gpus_per_actor=lab.num_gpus_per_actor)


def build_dataset(stage: LabelStage, prep, teacher, ledger) -> "ray.data.Dataset":
    # a corpus the run built in a URI run root's mirror is read from the run root, where every node finds it
    paths = [storage.remote_of(p) or p for p in stage.data.paths]
    ds = build_processor(processor_spec(stage, prep, teacher), ledger)(read_corpus(paths))
    return ds.map_batches(write_batch, fn_kwargs={"labels_dir": stage.paths.labels_dir,
                                                  "rejected_dir": stage.paths.rejected_dir},
                          batch_format="pyarrow", batch_size=None, num_cpus=0.25)
