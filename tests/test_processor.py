"""Several models through one actor pool (pipeline/generation/processor.py), at unit level: each row is prepared for
every model with that model's limits, and `ModelSwitcher` runs each part of a batch by its model's actor with one
model loaded at a time. The actors here only record what they are asked: the chain's evaluate runs the real vLLM
engines through it (tests/test_chain.py checks one engine start per generating model, in one actor process)."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.generation.prepare import PrepareSpec
from pipeline.generation.processor import ModelSwitcher, ProcessorSpec, prepare_for_models
from pipeline.generation.reader import RAW_SCHEMA


class Recording:
    """An actor of the switcher's kind: `load` / `release` / calls are written to the shared `events`."""

    def __init__(self, spec: str, events: list):
        self.spec, self.events = spec, events
        events.append(("start", spec))

    def load(self):
        self.events.append(("load", self.spec))

    def release(self):
        self.events.append(("release", self.spec))

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.events.append(("call", self.spec, batch.column("line").to_pylist()))
        return batch.append_column("by", pa.array([self.spec] * batch.num_rows))


def _spec(name: str, events: list) -> ProcessorSpec:
    return ProcessorSpec(prepare=None, engine=name, batch_size=4, concurrency=(1, 1), num_cpus_per_actor=1,
                         num_gpus_per_actor=0, actor=Recording, actor_kwargs={"events": events})


def _batch(models: list[str]) -> pa.Table:
    return pa.table({"line": list(range(len(models))), "model": models})


def test_each_part_goes_to_its_models_actor_with_one_model_loaded_at_a_time():
    events: list = []
    switcher = ModelSwitcher({"a": _spec("a", events), "b": _spec("b", events)})
    first = switcher(_batch(["a", "a", "b"]))
    second = switcher(_batch(["b", "a"]))
    assert first.column("by").to_pylist() == first.column("model").to_pylist() == ["a", "a", "b"]
    assert second.column("by").to_pylist() == second.column("model").to_pylist() == ["b", "a"]
    assert events == [("start", "a"), ("call", "a", [0, 1]), ("release", "a"), ("start", "b"), ("call", "b", [2]),
                      ("call", "b", [0]), ("release", "b"), ("load", "a"), ("call", "a", [1])]


def test_each_row_is_prepared_for_every_model_with_its_own_limits(tiny_models):
    rows = [{"id": 1, "prompt": "1 + 2 ="}, {"id": 2, "prompt": " ".join(["9 + 9 ="] * 20)}]
    batch = pa.table({"source": ["c.jsonl"] * 2, "line": [0, 1], "raw": [json.dumps(r).encode() for r in rows]},
                     schema=RAW_SCHEMA)
    specs = {name: PrepareSpec(tokenizer=str(tiny_models["teacher"]), revision=None, mode="generate",
                               max_prompt_tokens=limit, max_response_tokens=8, max_model_len=256, setting="evaluate")
             for name, limit in (("long", 200), ("short", 30))}
    out = prepare_for_models(batch, specs)
    assert out.column("model").to_pylist() == ["long", "long", "short", "short"]  # in model order
    assert out.column("id").to_pylist() == ["1", "2", "1", "2"]
    reasons = out.column("reason").to_pylist()
    assert reasons[:3] == [None, None, None] and "more than evaluate.max_prompt_tokens=30" in reasons[3]
    assert out.column("prompt_ids").to_pylist()[0] == out.column("prompt_ids").to_pylist()[2]
