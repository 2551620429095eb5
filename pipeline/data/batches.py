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


# Columns the train stage reads from the pairs contract (pipeline/data/schema.py PAIR_SCHEMA) for DPO and KTO.
PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def collate_completions(prompts: list, completions: list, max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences → input_ids, attention_mask [N, L]; labels, loss_mask [N, L-1] (1 at the
    positions that predict a completion token), cut from the left like `collate`."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        seq = np.concatenate([np.asarray(prompt, np.int64), np.asarray(completion, np.int64)])
        first = len(prompt) - 1
        cut = max(0, len(seq) - max_seq_len)
        if cut > first:
            raise ValueError(f"a response of {len(completion)} tokens does not fit train.max_seq_len={max_seq_len}")
        rows.append((seq[cut:], first - cut, len(completion)))
    length = max(len(r[0]) for r in rows)
    input_ids = np.full((len(rows), length), pad_id, np.int64)
    attention = np.zeros((len(rows), length), np.int64)
    labels = np.zeros((len(rows), length - 1), np.int64)
    mask = np.zeros((len(rows), length - 1), np.float32)
    for i, (seq, first, n_completion) in enumerate(rows):
        input_ids[i, :len(seq)], attention[i, :len(seq)] = seq, 1
        labels[i, :len(seq) - 1] = seq[1:]
        mask[i, first:first + n_completion] = 1
    return {k: torch.from_numpy(v) for k, v in dict(input_ids=input_ids, attention_mask=attention, labels=labels,
                                                      loss_mask=mask).items()}


def collate_pairs(batch: dict[str, Any], max_seq_len: int, pad_id: int, mismatched: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Numpy batch of B pairs → 2B sequences, the B chosen ones first, then the B rejected ones (`collate_completions`'
    tensors). `mismatched` adds KTO's `kl_*` tensors: each of the 2B prompts with the completion of the sequence
    before it (cyclically, as TRL pairs them), from which the reference point KL(π ‖ π_ref) is estimated."""
    prompts = list(batch["prompt_ids"]) * 2
    completions = list(batch["chosen_ids"]) + list(batch["rejected_ids"])
    out = collate_completions(prompts, completions, max_seq_len, pad_id)
    if mismatched:
        shifted = completions[-1:] + completions[:-1]
        out.update({f"kl_{k}": v for k, v in collate_completions(prompts, shifted, max_seq_len, pad_id).items()})
    return out
