"""Ray Data UDFs of the evaluate stage.

`TimedGenerator` is the generation path's vLLM actor (`pipeline.generation.engine.VLLMGenerator`, the one the label
stage runs: same engine settings, token ids in, top-k out) run greedily, timing its engine calls and, on its first
batch, a few requests one at a time after one untimed warm-up request (latency per request as a user of a served
model sees it). `Scorer` runs an HF model teacher-forced over the teacher's responses and returns the metric sums
of `pipeline.metrics`.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.generation.engine import VLLMGenerator, EngineSpec

TIMED_SCHEMA_EXTRA = [pa.field("engine_seconds", pa.float64()), pa.field("latency_s", pa.float64())]


class TimedGenerator(VLLMGenerator):
    """PREPARED rows → LABELED rows + engine_seconds (this row's share of its batch) + latency_s."""

    def __init__(self, spec: EngineSpec, latency_requests: int):
        super().__init__(spec)
        self.latency_left = latency_requests
        self.warmed = False

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
    """LABELED rows of the teacher → one row of teacher-forced metric sums for the model at `model_path`."""

    def __init__(self, model: str, revision: str | None, dtype: str, use_gpu: bool, k: int, max_seq_len: int):
        import torch
        from transformers import AutoModelForCausalLM

        from pipeline import storage

        storage.fetched(model)  # a model in a URI run root's mirror, on this actor's node
        # the model's own dtype on a GPU (auto: bf16); float32 on CPU, where bf16 matmuls are slow and inexact
        self.device = "cuda" if use_gpu else "cpu"
        torch_dtype = getattr(torch, dtype if use_gpu and dtype != "auto" else "bfloat16" if use_gpu else "float32")
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=torch_dtype).to(self.device)
        self.model.eval()
        self.k, self.max_seq_len = k, max_seq_len

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipeline.metrics import teacher_forced_sums
        from pipeline.data.batches import collate

        pad = getattr(self.model.config, "pad_token_id", None) or 0
        b = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
             for key, value in collate(rows, k=self.k, max_seq_len=self.max_seq_len, pad_id=pad).items()}
        with torch.no_grad():
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        sums = teacher_forced_sums(logits, b["labels"], b["loss_mask"], b["teacher_ids"], b["teacher_logprobs"],
                                   b["teacher_tail"])
        return {key: np.array([value]) for key, value in sums.items()}
