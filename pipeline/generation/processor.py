"""One generation path: a processor built once from a spec and applied to any dataset of corpus rows, the way
`ray.data.llm.build_processor` is: prepare (parse, chat template, token ids, limits) as CPU tasks, then a pool of
vLLM actors that Ray Data grows from `concurrency[0]` to `concurrency[1]` while rows wait, each actor reserving
its CPUs/GPUs. The label stage (the teacher over the corpus), evaluate (each model over the held-out rows) and the
student sampling to come all run through it; they differ only in their spec.

    process = build_processor(spec, ledger)
    ds = process(read_corpus(paths))   # LABELED_SCHEMA rows (+ what the actor adds), `reason` set where refused
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from pipeline.generation.engine import EngineSpec, VLLMGenerator, reference_labels
from pipeline.generation.prepare import PrepareSpec, prepare_batch
from pipeline.generation.reader import CorpusDatasource


@dataclass(frozen=True)
class ProcessorSpec:
    """Everything one generation pass needs: how rows are prepared, the engine each actor runs, and the pool."""

    prepare: PrepareSpec
    engine: EngineSpec
    batch_size: int
    concurrency: tuple[int, int]
    num_cpus_per_actor: float
    num_gpus_per_actor: float
    prepare_batch_size: int | None = None  # None: batch_size
    # the actor class (a VLLMGenerator) and its extra constructor arguments, e.g. evaluate's timed generator
    actor: type = VLLMGenerator
    actor_kwargs: dict[str, Any] = field(default_factory=dict)


def read_corpus(paths: list[str]) -> "ray.data.Dataset":
    """jsonl and Parquet corpus files (any pyarrow filesystem) as raw rows with their source and line."""
    return ray.data.read_datasource(CorpusDatasource(paths))


def build_processor(spec: ProcessorSpec, ledger=None) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """The dataset transformation `spec` describes; `ledger` (a `Ledger` actor) makes a run resumable and refuses
    repeated ids. Reference mode runs no engine: the corpus's own responses become one-hot labels in a CPU task."""

    def process(ds: "ray.data.Dataset") -> "ray.data.Dataset":
        ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": spec.prepare, "ledger": ledger}, batch_format="pyarrow",
                            batch_size=spec.prepare_batch_size or spec.batch_size, num_cpus=0.5)
        # about one engine batch per block (the last piece of each prepared block is bundled with the next): a read
        # block (up to 4,096 rows of one file) would otherwise be one actor task, so one actor would label a whole
        # small corpus while the pool never grows, and no row of that block would reach the writer (a shard, the
        # progress display) before the last one. Ray Data runs it as its own step of short 1-CPU tasks (Ray 2.60's
        # repartition takes no resource arguments, and it fuses with prepare only at the same CPUs per task)
        ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
        if spec.engine.mode == "reference":
            return ds.map_batches(reference_labels, fn_kwargs={"k": spec.engine.k}, batch_format="pyarrow",
                                  batch_size=spec.batch_size, num_cpus=0.5)
        lo, hi = spec.concurrency
        return ds.map_batches(spec.actor, fn_constructor_kwargs={"spec": spec.engine, **spec.actor_kwargs},
                              batch_format="pyarrow", batch_size=spec.batch_size,
                              compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                              num_cpus=spec.num_cpus_per_actor, num_gpus=spec.num_gpus_per_actor)

    return process
