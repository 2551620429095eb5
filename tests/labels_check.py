"""Reading label shards back for assertions, and an independent transformers reference to align against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schema import LOGPROB_STEP, decode_topk, validate_labels_table


def read_dir(folder: Path) -> pa.Table | None:
    shards = sorted(Path(folder).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(s) for s in shards]) if shards else None


def alignment(labels: pa.Table, teacher_dir: Path, k: int) -> dict[str, float]:
    """Compare stored top-k with an fp32 transformers forward pass of the same weights on the same ids."""
    import torch
    from transformers import AutoModelForCausalLM

    validate_labels_table(labels, "labels")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    top1_hits = positions = 0
    max_lp_err = max_tok_err = 0.0
    for row in labels.to_pylist():
        prompt, response = row["prompt_ids"], row["response_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) + len(response) - 1].numpy()
        ids, _, _ = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprob"], row["tail_logprob"], k)
        codes = np.frombuffer(row["topk_codes"], np.uint8).reshape(-1, k)
        top1 = np.asarray(row["top1_logprob"], np.float64)
        for t in range(len(response)):
            positions += 1
            best = int(ref[t].argmax())
            # the reference top-1 is stored, in the best code bucket (codes resolve 1/8 nat)
            top1_hits += int(best in ids[t] and codes[t][list(ids[t]).index(best)] == 0)
            stored = top1[t] - codes[t] * LOGPROB_STEP
            max_lp_err = max(max_lp_err, float(np.abs(stored - ref[t][ids[t]]).max()))
            max_tok_err = max(max_tok_err, abs(float(row["token_logprob"][t]) - float(ref[t][response[t]])))
    return {"top1_agreement": top1_hits / positions, "max_logprob_err": max_lp_err,
            "max_token_logprob_err": max_tok_err, "positions": positions}
