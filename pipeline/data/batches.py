"""Labeled rows → padded training batches, keeping the teacher sparse (top-k) end to end.

Logits at position j predict token j+1, so a row of prompt P and response T tokens is scored at positions
P-1 … P+T-2 of the shifted sequence; the teacher's stored distributions land exactly there. The teacher
arrives as [B, L, k] ids/logprobs plus a [B, L] tail — never a [B, L, V] tensor.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.schema import decode_topk

# Columns the train stage needs from the label contract (pipeline/data/schema.py).
REQUIRED_COLUMNS = ["prompt_ids", "response_ids", "topk_ids", "topk_codes", "top1_logprob", "tail_logprob"]


def collate(batch: dict[str, Any], k: int, max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Numpy batch of labeled rows → input_ids, attention_mask [B, L]; labels, loss_mask [B, L-1];
    teacher_ids [B, L-1, k] int64, teacher_logprobs [B, L-1, k], teacher_tail [B, L-1]."""
    rows = []
    for prompt, response, ids, codes, top1, tail in zip(*(batch[c] for c in REQUIRED_COLUMNS)):
        t_ids, t_lp, t_tail = decode_topk(ids, codes, top1, tail, k)
        seq = np.concatenate([np.asarray(prompt, np.int64), np.asarray(response, np.int64)])
        first = len(prompt) - 1  # shifted position of the first response token
        cut = max(0, len(seq) - max_seq_len)  # keep the response: cut the prompt from the left
        if cut > first:
            raise ValueError(f"a response of {len(response)} tokens does not fit train.max_seq_len={max_seq_len}")
        rows.append((seq[cut:], first - cut, t_ids, t_lp, t_tail))
    length = max(len(r[0]) for r in rows)
    b = len(rows)
    input_ids = np.full((b, length), pad_id, np.int64)
    attention = np.zeros((b, length), np.int64)
    labels = np.zeros((b, length - 1), np.int64)
    mask = np.zeros((b, length - 1), np.float32)
    t_ids = np.zeros((b, length - 1, k), np.int64)
    t_lp = np.full((b, length - 1, k), -30.0, np.float32)
    t_tail = np.zeros((b, length - 1), np.float32)
    for i, (seq, first, ids, lp, tail) in enumerate(rows):
        n, T = len(seq), len(ids)
        input_ids[i, :n], attention[i, :n] = seq, 1
        labels[i, :n - 1] = seq[1:]
        mask[i, first:first + T] = 1
        t_ids[i, first:first + T], t_lp[i, first:first + T], t_tail[i, first:first + T] = ids, lp, tail
    return {k_: torch.from_numpy(v) for k_, v in dict(
        input_ids=input_ids, attention_mask=attention, labels=labels, loss_mask=mask, teacher_ids=t_ids,
        teacher_logprobs=t_lp, teacher_tail=t_tail).items()}
