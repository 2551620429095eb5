"""Distillation losses as pure functions of tensors, on the sparse top-k soft labels.

The teacher is known only through its top-k logprobs and the mass outside them, so both distributions are
compared over k+1 buckets: the teacher's k tokens plus one tail bucket. The student's buckets are its own
logprobs at the teacher's k ids and the log of everything else. A temperature is applied to the bucket
logits of both sides alike, which keeps T consistent; with k = vocabulary the tail is empty and every
divergence here is the exact full-vocabulary one. No full-vocabulary teacher tensor is ever built.

Shapes: B batch, S sequence, V vocabulary, k top-k. Masks are 1 where a position is scored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def bucket_logprobs(logprobs_topk: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """[..., k] top-k logprobs and [...] tail logprob → [..., k+1] bucket logprobs."""
    return torch.cat([logprobs_topk, tail_logprob.unsqueeze(-1)], dim=-1)


def student_buckets(student_logits: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Student logits [B, S, V] and teacher top-k ids [B, S, k] → student bucket logprobs [B, S, k+1] (T=1)."""
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, teacher_ids) - log_z
    # the tail as a logsumexp over the other ids (exact, unlike log(1 - sum p_topk)); an empty tail becomes
    # a finite -1e4 so gradients stay finite
    rest = logits.scatter(-1, teacher_ids, float("-inf"))
    tail = (torch.logsumexp(rest, dim=-1) - log_z.squeeze(-1)).clamp(min=-1e4)
    return bucket_logprobs(top, tail)


def temper(buckets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Apply a softmax temperature to bucket logprobs: log_softmax(buckets / T)."""
    return torch.log_softmax(buckets / temperature, dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, per position; 0·log 0 counts as 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def forward_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over scored positions of KL(teacher || student); inputs are bucket logprobs [B, S, k+1]."""
    return _masked_mean(_kl(teacher_log, student_log), mask)


def reverse_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of KL(student || teacher) (mode-seeking)."""
    return _masked_mean(_kl(student_log, teacher_log), mask)


def generalized_jsd(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5) -> torch.Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q (p teacher, q student), as in TRL's GKD.

    β = 0 and β = 1 are the limits forward KL(p‖q) and reverse KL(q‖p) (the mixture form vanishes there,
    so those ends are computed directly); β = 0.5 is the symmetric Jensen–Shannon divergence.
    """
    if beta <= 0:
        return forward_kl(teacher_log, student_log, mask)
    if beta >= 1:
        return reverse_kl(teacher_log, student_log, mask)
    import math

    mix = torch.logsumexp(torch.stack([teacher_log + math.log(beta), student_log + math.log(1 - beta)]), dim=0)
    per_pos = beta * _kl(teacher_log, mix) + (1 - beta) * _kl(student_log, mix)
    return _masked_mean(per_pos, mask)


def skew_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1,
            reverse: bool = False) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p ‖ α·p + (1−α)·q); `reverse` gives KL(q ‖ α·q + (1−α)·p). α=0 is plain KL."""
    import math

    a, b = (student_log, teacher_log) if reverse else (teacher_log, student_log)
    if alpha <= 0:
        return _masked_mean(_kl(a, b), mask)
    mix = torch.logsumexp(torch.stack([a + math.log(alpha), b + math.log(1 - alpha)]), dim=0)
    return _masked_mean(_kl(a, mix), mask)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "skew_kl": skew_kl}


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy on the actual next tokens; logits [B, S, V], labels and mask [B, S]."""
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return _masked_mean(ce.view_as(labels), mask)


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor,
                      alpha: float = 0.3, temperature: float = 2.0, divergence: str = "forward_kl",
                      **divergence_kwargs) -> dict[str, torch.Tensor]:
    """L = α·CE(hard) + (1−α)·T²·D(teacher_T, student_T), D one of `DIVERGENCES`.

    student_logits [B, S, V]; labels, mask [B, S]; teacher_ids [B, S, k] (int64); teacher_logprobs
    [B, S, k] raw (T=1) logprobs; teacher_tail [B, S] log of the mass outside the top-k.
    α = 1 is plain supervised fine-tuning (the teacher tensors are then ignored).
    Returns {"loss", "ce", "kd"}.
    """
    ce = hard_ce(student_logits, labels, mask)
    if alpha >= 1:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    t_log = temper(bucket_logprobs(teacher_logprobs.float(), teacher_tail.float()), temperature)
    s_log = temper(student_buckets(student_logits, teacher_ids), temperature)
    kd = DIVERGENCES[divergence](t_log, s_log, mask, **divergence_kwargs)
    return {"loss": alpha * ce + (1 - alpha) * temperature**2 * kd, "ce": ce, "kd": kd}
