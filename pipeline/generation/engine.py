"""The generation actor: a vLLM engine that turns prepared rows into responses with compact top-k soft labels
(the teacher labeling a corpus, or any model generating for evaluation).

A thin `map_batches` class around `vllm.LLM` rather than `ray.data.llm`: its engine stage hands back
every top-k entry as a Python dict per token per row (Ray then pickles them as object columns), which on
CPU costs more than the model itself; here the engine returns flat logprob arrays
(`SamplingParams(flat_logprobs=True)`) that go straight into numpy and the Parquet codec. Prompts go in as
token ids (`TokensPrompt`), so the ids in the output are exactly the ids scored.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.data.schema import LABEL_SCHEMA, LOGPROB_CODES, LOGPROB_STEP, SAMPLE_SCHEMA, encode_topk
from pipeline.generation.prepare import PREPARED_SCHEMA

log = logging.getLogger(__name__)
# when the engine call that produced a row ran (the actor, the call's start and end, wall clock): what the label
# stage's steady rate is measured from (first to last output of each actor); not stored with the labels
ENGINE_TIMING = [pa.field("engine_actor", pa.string()), pa.field("engine_started", pa.float64()),
                 pa.field("engine_finished", pa.float64())]
LABELED_SCHEMA = pa.schema(list(LABEL_SCHEMA) + [pa.field("reason", pa.string())] + ENGINE_TIMING)
# the student's samples of a prompt, before the teacher scores them (`StudentSampler` → `SampleScorer`)
SAMPLED_SCHEMA = pa.schema(list(PREPARED_SCHEMA) + [pa.field("samples", pa.list_(pa.list_(pa.int32())))])
# scored samples: one row per sample, its index among the prompt's samples beside the labels
SAMPLE_LABELED_SCHEMA = pa.schema(list(SAMPLE_SCHEMA) + [pa.field("reason", pa.string())] + ENGINE_TIMING)


@dataclass(frozen=True)
class EngineSpec:
    model: str
    revision: str | None
    dtype: str
    max_model_len: int
    tensor_parallel_size: int
    mode: str
    k: int
    max_response_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    # the engine settings: every field of `pipeline.config.EngineConfig`
    gpu_memory_utilization: float
    max_logprobs: int
    max_num_seqs: int
    enforce_eager: bool
    kv_cache_memory_bytes: int | None = None
    in_process: bool = False
    # responses sampled per prompt (mode "sample": the student writes them, no logprobs kept)
    n: int = 1


def engine_kwargs(spec: EngineSpec) -> dict:
    """The vLLM engine arguments a teacher spec implies (shared with the benchmark's raw-vLLM baseline)."""
    kwargs = dict(model=spec.model, revision=spec.revision, tokenizer_revision=spec.revision, dtype=spec.dtype,
                  max_model_len=spec.max_model_len,
                  tensor_parallel_size=spec.tensor_parallel_size, gpu_memory_utilization=spec.gpu_memory_utilization,
                  max_logprobs=spec.max_logprobs, max_num_seqs=spec.max_num_seqs, enforce_eager=spec.enforce_eager,
                  seed=spec.seed or 0)
    if spec.kv_cache_memory_bytes is not None:  # a fixed KV cache instead of a share of the device's memory
        kwargs["kv_cache_memory_bytes"] = spec.kv_cache_memory_bytes
    if spec.in_process:  # the model runs in this process (see `VLLMGenerator`)
        kwargs["distributed_executor_backend"] = "uni"
    elif spec.tensor_parallel_size > 1:
        # the actor holds the GPUs its engine spans (Ray set CUDA_VISIBLE_DEVICES to them): vLLM's worker processes
        # use them directly. vLLM would otherwise pick its Ray executor inside a Ray actor and ask Ray for another
        # placement group of GPUs, which this actor already holds
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def sampling_params(spec: EngineSpec, prompt_len: int, row_seed: int | None):
    """generate: sample the response, with the raw top-k at every generated position; score: one dummy
    token, with the raw top-k at every prompt position (the response is part of the prompt)."""
    from vllm import SamplingParams

    if spec.mode == "score":
        return SamplingParams(max_tokens=1, prompt_logprobs=spec.k, flat_logprobs=True, detokenize=False)
    if spec.mode == "sample":
        return SamplingParams(n=spec.n, max_tokens=max(1, min(spec.max_response_tokens, spec.max_model_len - prompt_len)),
                              temperature=spec.temperature, top_p=spec.top_p, seed=row_seed, detokenize=False)
    return SamplingParams(
        max_tokens=max(1, min(spec.max_response_tokens, spec.max_model_len - prompt_len)),
        temperature=spec.temperature, top_p=spec.top_p, seed=row_seed,
        logprobs=spec.k, flat_logprobs=True, detokenize=False,
    )


def flat_to_arrays(flat, first: int, count: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions [first, first+count) of a vLLM FlatLogprobs: each holds the actual token then the top-k.

    Returns actual ids [T], actual logprobs [T], top-k ids [T, k], top-k logprobs [T, k].
    """
    start, end = flat.start_indices[first], flat.end_indices[first + count - 1]
    if end - start != count * (k + 1):
        raise RuntimeError(f"vLLM returned {end - start} logprob entries for {count} positions, expected k+1={k + 1} each")
    ids = np.asarray(flat.token_ids[start:end], dtype=np.int64).reshape(count, k + 1)
    lps = np.asarray(flat.logprobs[start:end], dtype=np.float64).reshape(count, k + 1)
    return ids[:, 0], lps[:, 0], ids[:, 1:], lps[:, 1:]


def label_columns(prompt_ids: list[int], response_ids: np.ndarray, flat, first: int, k: int) -> dict:
    """One labeled row's soft-label columns from the engine's flat logprobs."""
    actual, actual_lp, top_ids, top_lps = flat_to_arrays(flat, first, len(response_ids), k)
    if not np.array_equal(actual, response_ids):
        raise RuntimeError("vLLM scored different token ids than it was given")
    enc = encode_topk(top_ids, top_lps)
    return {"prompt_ids": prompt_ids, "response_ids": response_ids.astype(np.int32).tolist(), **enc,
            "token_logprob": actual_lp.astype(np.float16)}


class VLLMGenerator:
    """Ray Data UDF: PREPARED rows in, LABELED rows out (rows with a reason pass through untouched)."""

    schema = LABELED_SCHEMA  # of the rows it returns
    role = "teacher"  # the model it runs, as refusals name it

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.load()

    def load(self) -> None:
        """Start the engine (again, after `release`)."""
        if self.spec.in_process:  # engine core and worker in this actor: no two processes that import torch and vLLM
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        from pipeline import storage

        storage.fetched(self.spec.model)  # a model in a URI run root's mirror, on this actor's node
        self.llm = LLM(**engine_kwargs(self.spec))

    def release(self) -> None:
        """Stop the engine and give back its memory (device memory included), as vLLM does between the engines it
        starts one after another in one process; `load` starts it again."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["reason"] is None]
        if todo:
            started = time.time()
            self._label(rows, todo)
            timing = {"engine_actor": self.actor, "engine_started": started, "engine_finished": time.time()}
            for i in todo:
                rows[i].update(timing)
        return pa.Table.from_pylist([_complete(r) for r in rows], schema=self.schema)

    def _label(self, rows: list[dict], todo: list[int]) -> None:
        from vllm.inputs import TokensPrompt

        spec = self.spec
        prompts = [TokensPrompt(prompt_token_ids=rows[i]["prompt_ids"] + rows[i]["response_ids"]) for i in todo]
        params = [sampling_params(spec, len(p["prompt_token_ids"]), _row_seed(spec, rows[i]))
                  for i, p in zip(todo, prompts)]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:  # one bad request fails the call: retry one by one to find it
            log.warning("%s batch failed (%s); retrying rows one by one", self.role, e)
            outputs = []
            for p, sp, i in zip(prompts, params, todo):
                try:
                    outputs.extend(self.llm.generate([p], sp, use_tqdm=False))
                except Exception as row_error:
                    rows[i]["reason"] = f"{self.role} engine refused the row: {str(row_error).splitlines()[0]}"
                    outputs.append(None)
        for i, out in zip(todo, outputs):
            if out is None:
                continue
            row = rows[i]
            try:
                if spec.mode == "sample":
                    row["samples"] = [list(gen.token_ids) for gen in out.outputs]
                elif spec.mode == "score":
                    response = np.asarray(row["response_ids"], dtype=np.int64)
                    row.update(label_columns(row["prompt_ids"], response, out.prompt_logprobs,
                                             len(row["prompt_ids"]), spec.k))
                else:
                    gen = out.outputs[0]
                    response = np.asarray(gen.token_ids, dtype=np.int64)
                    row.update(label_columns(row["prompt_ids"], response, gen.logprobs, 0, spec.k))
            except Exception as e:
                row["reason"] = f"could not read the {self.role}'s output: {e}"

    def __del__(self):
        # Without this an engine worker process (GBs) outlives the actor when Ray Data retires it.
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()


class StudentSampler(VLLMGenerator):
    """Ray Data UDF of the sample stage's first pool: PREPARED rows in, SAMPLED rows out, the model (the student)
    writing `spec.n` responses per prompt (`spec.mode` "sample")."""

    schema = SAMPLED_SCHEMA
    role = "student"


class SampleScorer(VLLMGenerator):
    """Ray Data UDF of the sample stage's second pool: SAMPLED rows in, one scored row per sample out (the teacher
    in score mode: its top-k and tail at every position of the student's response). A prompt's samples leave in one
    table, so they reach one shard together and a resumed run finds a prompt whole or not at all."""

    schema = SAMPLE_LABELED_SCHEMA

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            if row["reason"] is not None or not row["samples"]:
                rows.append({**row, "reason": row["reason"] or "the student returned no sample"})
                continue
            for j, sample in enumerate(row["samples"]):
                rows.append({**row, "response_ids": sample, "sample": j})
        expanded = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "samples"} for r in rows])
        return super().__call__(expanded)


def reference_labels(batch: pa.Table, k: int) -> pa.Table:
    """Ray Data UDF for `label.mode=reference`: PREPARED rows in, LABELED rows out, no engine. Each reference
    token becomes a one-hot teacher: itself at logprob 0 and k-1 filler ids at the codec's floor (16 nats
    below), so its soft label is the reference (within 2e-6 of the mass) and KD on it is plain SFT. For data
    that only an SFT pass (α=1) reads, like the offline demo's teacher's own training set."""
    floor = -LOGPROB_CODES * LOGPROB_STEP
    rows = batch.to_pylist()
    for row in rows:
        if row["reason"] is not None:
            continue
        response = np.asarray(row["response_ids"], dtype=np.int64)
        others = np.arange(k - 1)[None, :]
        others = others + (others >= response[:, None])  # the k-1 smallest ids that are not the reference
        ids = np.concatenate([response[:, None], others], axis=1)
        logprobs = np.full(ids.shape, floor)
        logprobs[:, 0] = 0.0
        row.update(encode_topk(ids, logprobs), token_logprob=np.zeros(len(response), np.float16))
    return pa.Table.from_pylist([_complete(r) for r in rows], schema=LABELED_SCHEMA)


def _row_seed(spec: EngineSpec, row: dict) -> int | None:
    # Per-row seeds tied to the row, not to batch order, so a resumed run generates what a clean one would.
    if spec.seed is None:
        return None
    return (spec.seed * 1_000_003 + hash_line(row["source"], row["line"])) % (2**31)


def hash_line(source: str, line: int) -> int:
    import zlib

    return zlib.crc32(f"{source}:{line}".encode())


def _complete(row: dict) -> dict:
    if row["reason"] is not None:
        return {name: row.get(name) for name in ("id", "source", "line", "reason")}
    return row
