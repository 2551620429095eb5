"""Ray Data UDFs of the evaluate stage.

`TimedGenerator` is the generation path's vLLM actor (`pipeline.generation.engine.VLLMGenerator`, the one the label
stage runs: same engine settings, token ids in, top-k out) run greedily, timing its engine calls and, on its first
batch, a few requests one at a time after one untimed warm-up request (latency per request as a user of a served
model sees it). `Scorer` runs HF models teacher-forced over the teacher's responses, one after another in one actor,
and returns each model's metric sums of `pipeline.metrics`.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import pyarrow as pa

from pipeline.generation.engine import VLLMGenerator, EngineSpec

TIMED_SCHEMA_EXTRA = [pa.field("engine_seconds", pa.float64()), pa.field("latency_s", pa.float64())]


class TimedGenerator(VLLMGenerator):
    """PREPARED rows → LABELED rows + engine_seconds (this row's share of its batch) + latency_s."""

    def __init__(self, spec: EngineSpec, latency_requests: int):
        self.latency_left = latency_requests
        super().__init__(spec)

    def load(self) -> None:
        super().load()
        self.warmed = False  # a new engine's first request pays its set-up again

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm.inputs import TokensPrompt

        from pipeline.generation.engine import sampling_params

        latency = [None] * batch.num_rows
        prompts = batch.column("prompt_ids").to_pylist()
        reasons = batch.column("reason").to_pylist()
        if self.latency_left > 0 and not self.warmed:  # the engine's first request pays one-off set-up: untimed
            first = next((i for i, r in enumerate(reasons) if r is None), None)
            if first is not None:
                self.llm.generate([TokensPrompt(prompt_token_ids=prompts[first])],
                                  sampling_params(self.spec, len(prompts[first]), None), use_tqdm=False)
                self.warmed = True
        for i in range(batch.num_rows):
            if self.latency_left <= 0:
                break
            if reasons[i] is not None:
                continue
            start = time.perf_counter()
            self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i])],
                              sampling_params(self.spec, len(prompts[i]), None), use_tqdm=False)
            latency[i] = time.perf_counter() - start
            self.latency_left -= 1
        start = time.perf_counter()
        out = super().__call__(batch)
        share = (time.perf_counter() - start) / max(1, out.num_rows)
        return (out.append_column(TIMED_SCHEMA_EXTRA[0], pa.array([share] * out.num_rows, pa.float64()))
                .append_column(TIMED_SCHEMA_EXTRA[1], pa.array(latency, pa.float64())))


class Scorer:
    """LABELED rows of the teacher, each tagged with the model to score it (`model`) → one row of teacher-forced
    metric sums per model in the batch (`pipeline.metrics`), with `model`. `models`: name → (path, revision, dtype);
    the models are loaded one at a time, in the order their rows come."""

    def __init__(self, models: dict[str, tuple[str, str | None, str]], use_gpu: bool, k: int, max_seq_len: int):
        self.models, self.use_gpu, self.k, self.max_seq_len = models, use_gpu, k, max_seq_len
        self.device = "cuda" if use_gpu else "cpu"
        self.current, self.model = None, None

    def _load(self, name: str):
        import torch
        from transformers import AutoModelForCausalLM

        from pipeline import storage

        if name == self.current:
            return self.model
        self.model, self.current = None, None  # the one loaded before goes first
        gc.collect()
        if self.use_gpu:
            torch.cuda.empty_cache()
        path, revision, dtype = self.models[name]
        storage.fetched(path)  # a model in a URI run root's mirror, on this actor's node
        # the model's own dtype on a GPU (auto: bf16); float32 on CPU, where bf16 matmuls are slow and inexact
        torch_dtype = getattr(torch, dtype if self.use_gpu and dtype != "auto" else "bfloat16" if self.use_gpu
                              else "float32")
        self.model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch_dtype).to(self.device)
        self.model.eval()
        self.current = name
        return self.model

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys(rows["model"].tolist()))
        sums = [self._score(self._load(name), {key: value[rows["model"] == name] for key, value in rows.items()
                                               if key != "model"}) for name in names]
        return {"model": np.array(names), **{key: np.array([s[key] for s in sums]) for key in sums[0]}}

    def _score(self, model, rows: dict[str, np.ndarray]) -> dict[str, float]:
        import torch

        from pipeline.metrics import teacher_forced_sums
        from pipeline.data.batches import collate

        pad = getattr(model.config, "pad_token_id", None) or 0
        b = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
             for key, value in collate(rows, k=self.k, max_seq_len=self.max_seq_len, pad_id=pad).items()}
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        return teacher_forced_sums(logits, b["labels"], b["loss_mask"], b["teacher_ids"], b["teacher_logprobs"],
                                   b["teacher_tail"])
