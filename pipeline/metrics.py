"""Evaluation metrics as pure functions: answers graded by the task, and teacher-forced comparisons.

Teacher-forced metrics run the model under evaluation over the teacher's own greedy response and compare,
at every response position, its distribution with the teacher's top-k + tail buckets (the label format):
top-1 agreement (the model's argmax is the teacher's most likely token), KL(teacher ‖ model) over the
k+1 buckets at T=1, and the model's negative log-likelihood of the teacher's tokens (→ perplexity).
They return sums, so batches and actors combine by addition.
"""
from __future__ import annotations

import math
import re

import torch

from pipeline.losses.kd import forward_kl, student_buckets, teacher_buckets

_NUMBER = re.compile(r"-?\d+")


def last_number(text: str) -> str | None:
    """The last integer in a text ("The answer is -12." → "-12"), the arithmetic task's answer."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def answer_correct(text: str, answer: str, metric: str = "last_number") -> bool:
    """Grade one generated answer: `last_number` (the task's integer answer) or `exact` (stripped text)."""
    if metric == "exact":
        return text.strip() == str(answer).strip()
    return last_number(text) == str(answer).strip()


def teacher_forced_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, teacher_ids: torch.Tensor,
                        teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor) -> dict[str, float]:
    """logits [B, S, V] of the model under evaluation; labels, mask [B, S]; teacher top-k [B, S, k] + tail [B, S].

    Returns sums over scored positions: tokens, agree (argmax == teacher's top-1), kl, nll.
    """
    logits = logits.float()
    mask = mask.float()
    teacher_top1 = teacher_ids.gather(-1, teacher_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    agree = ((logits.argmax(-1) == teacher_top1).float() * mask).sum()
    kl = forward_kl(teacher_buckets(teacher_logprobs, teacher_tail),
                    student_buckets(logits, teacher_ids), mask) * mask.sum()
    nll = -(torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum()
    return {"tokens": float(mask.sum()), "agree": float(agree), "kl": float(kl), "nll": float(nll)}


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Sums → top1_agreement, kl_to_teacher (nats/token), perplexity (on the teacher's tokens)."""
    n = max(sums["tokens"], 1.0)
    return {"top1_agreement": sums["agree"] / n, "kl_to_teacher": sums["kl"] / n,
            "perplexity": math.exp(sums["nll"] / n), "scored_tokens": int(sums["tokens"])}
