"""One generation path: a processor built once from a spec and applied to any dataset of corpus rows, the way
`ray.data.llm.build_processor` is: prepare (parse, chat template, token ids, limits) as CPU tasks, then a pool of
vLLM actors that Ray Data grows from `concurrency[0]` to `concurrency[1]` while rows wait, each actor reserving
its CPUs/GPUs. The label stage (the teacher over the corpus), evaluate (each model over the held-out rows) and the
student sampling to come all run through it; they differ only in their spec.

    process = build_processor(spec, ledger)
    ds = process(read_corpus(paths))   # LABELED_SCHEMA rows (+ what the actor adds), `reason` set where refused

Several models over the same rows (evaluate) share one pool whose actors load the models one after another
(`build_models_processor`): each row is prepared once per model and tagged with its name (`model`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
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


def read_corpus(paths: list[str], blocks: int | None = None) -> "ray.data.Dataset":
    """jsonl and Parquet corpus files (any pyarrow filesystem) as raw rows with their source and line; `blocks`: as
    many read tasks, their output not split further (the reader still cuts a file every 4,096 rows), e.g. 1 to keep
    a small file's rows in one block."""
    return ray.data.read_datasource(CorpusDatasource(paths), override_num_blocks=blocks)


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


def build_models_processor(specs: dict[str, ProcessorSpec]) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """`build_processor` for several models (name → spec) over the same rows, through one actor pool whose actors
    load the models one after another (`ModelSwitcher`) rather than one pool started per model. Measured here for
    the tiny models: a new vLLM actor costs about 15 s of CPU before its first rows (importing vLLM, the engine, the
    first batch's set-up) against about 3 s to load another model into a running one; on a GPU node the start also
    pays CUDA's initialization. Each read block is prepared whole, once per model (its tokenizer and limits), and
    goes on in model order, so an actor switches model about once per model and read block (4,096 rows at most):
    read a small file as one block (`read_corpus(paths, blocks=1)`). The pool (concurrency, CPUs) is the first spec's;
    each actor holds the most GPUs any of the models spans, so a 1-GPU model among tensor-parallel ones runs on
    actors of the larger size. Output rows carry `model`."""
    first = next(iter(specs.values()))
    if any(spec.engine.mode == "reference" for spec in specs.values()):
        raise ValueError("reference mode runs no engine: build_processor takes it, one spec at a time")

    def process(ds: "ray.data.Dataset") -> "ray.data.Dataset":
        ds = ds.map_batches(prepare_for_models, fn_kwargs={"specs": {name: s.prepare for name, s in specs.items()}},
                            batch_format="pyarrow", batch_size=None, num_cpus=0.5)
        ds = ds.repartition(target_num_rows_per_block=first.batch_size)  # as in build_processor
        lo, hi = first.concurrency
        return ds.map_batches(ModelSwitcher, fn_constructor_kwargs={"specs": specs}, batch_format="pyarrow",
                              batch_size=first.batch_size, compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                              num_cpus=first.num_cpus_per_actor,
                              num_gpus=max(spec.num_gpus_per_actor for spec in specs.values()))

    return process


def prepare_for_models(batch: pa.Table, specs: dict) -> pa.Table:
    """RAW rows in; each row prepared for every model (name → `PrepareSpec`), in model order, with `model`."""
    parts = [prepare_batch(batch, spec) for spec in specs.values()]
    return pa.concat_tables([part.append_column("model", pa.array([name] * part.num_rows, pa.string()))
                             for name, part in zip(specs, parts)])


def split_by_model(batch: pa.Table) -> list[tuple[str, pa.Table]]:
    """(model, its rows without the `model` column) for each model in `batch`, in the order they first come."""
    return [(name, batch.filter(pc.equal(batch["model"], name)).drop_columns(["model"]))
            for name in dict.fromkeys(batch.column("model").to_pylist())]


class ModelSwitcher:
    """Ray Data UDF: prepared rows of several models (`model`) in, each part run by its model's actor (the spec's
    `actor`, e.g. a `VLLMGenerator`), made on first use; one engine is loaded at a time, the others released (their
    actor's state, such as timings, is kept for when the model comes back)."""

    def __init__(self, specs: dict[str, ProcessorSpec]):
        self.specs, self.actors, self.current = specs, {}, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for name, rows in split_by_model(batch):
            part = self._switch(name)(rows)
            parts.append(part.append_column("model", pa.array([name] * part.num_rows, pa.string())))
        return pa.concat_tables(parts)

    def _switch(self, name: str):
        if name != self.current and self.current is not None:
            self.actors[self.current].release()
            self.current = None  # until the next one has loaded
        spec = self.specs[name]
        if name not in self.actors:
            self.actors[name] = spec.actor(spec.engine, **spec.actor_kwargs)
        elif name != self.current:
            self.actors[name].load()
        self.current = name
        return self.actors[name]
