"""Distillation losses as pure functions of tensors, on the sparse top-k soft labels.

The teacher is known only through its top-k logprobs and the mass outside them, so both distributions are
compared over k+1 buckets: the teacher's k tokens plus one tail bucket. The student's buckets are its own
logprobs at the teacher's k ids and the log of everything else. A temperature is applied to the bucket
logits of both sides alike, which keeps T consistent; with k = vocabulary the tail is empty and every
divergence here is the exact full-vocabulary one. No full-vocabulary teacher tensor is ever built.

Shapes: B batch, S sequence, V vocabulary, k top-k. Masks are 1 where a position is scored.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.schema import MIN_TAIL_LOGPROB

# an empty tail bucket (no mass outside the top-k): finite, so gradients stay finite, and still nothing after a
# temperature (exp(-1e4 / T) is 0 in float32 for any T below ~100)
EMPTY_TAIL = -1e4


def bucket_logprobs(logprobs_topk: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """[..., k] top-k logprobs and [...] tail logprob → [..., k+1] bucket logprobs."""
    return torch.cat([logprobs_topk, tail_logprob.unsqueeze(-1)], dim=-1)


def teacher_buckets(logprobs_topk: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """Stored teacher labels → bucket logprobs [..., k+1] (T=1). The label codec floors the tail at
    `MIN_TAIL_LOGPROB` (e^-30) so that log 0 is never stored; a tail at that floor is empty, and is made so here:
    at a temperature T the floor would otherwise become e^(-30/T) of the mass (5e-4 at T=4), which the student,
    whose tail is truly empty when k is the vocabulary, can never match. (Decoding renormalises the quantised
    top-k, which moves the floor by up to a few hundredths of a nat: within half a nat of it counts as empty.)"""
    tail = tail_logprob.float()
    tail = torch.where(tail <= MIN_TAIL_LOGPROB + 0.5, torch.full_like(tail, EMPTY_TAIL), tail)
    return bucket_logprobs(logprobs_topk.float(), tail)


def student_buckets(student_logits: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Student logits [B, S, V] and teacher top-k ids [B, S, k] → student bucket logprobs [B, S, k+1] (T=1)."""
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, teacher_ids) - log_z
    # the tail as a logsumexp over the other ids (exact, unlike log(1 - sum p_topk)); an empty one is EMPTY_TAIL
    rest = logits.scatter(-1, teacher_ids, float("-inf"))
    tail = (torch.logsumexp(rest, dim=-1) - log_z.squeeze(-1)).clamp(min=EMPTY_TAIL)
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


def skew_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor, skew: float = 0.1,
            reverse: bool = False) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p ‖ s·p + (1−s)·q); `reverse` gives KL(q ‖ s·q + (1−s)·p). s=0 is plain KL.
    (DistiLLM calls s α; here α is the hard-label weight of `distillation_loss`.)"""
    import math

    a, b = (student_log, teacher_log) if reverse else (teacher_log, student_log)
    if skew <= 0:
        return _masked_mean(_kl(a, b), mask)
    mix = torch.logsumexp(torch.stack([a + math.log(skew), b + math.log(1 - skew)]), dim=0)
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
    t_log = temper(teacher_buckets(teacher_logprobs, teacher_tail), temperature)
    s_log = temper(student_buckets(student_logits, teacher_ids), temperature)
    kd = DIVERGENCES[divergence](t_log, s_log, mask, **divergence_kwargs)
    return {"loss": alpha * ce + (1 - alpha) * temperature**2 * kd, "ce": ce, "kd": kd}


def configured_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: dict[str, Any],
                    head: torch.nn.Module | None = None, chunk_tokens: int = 1024, chunks: int | None = None,
                    partitioned: bool = False) -> dict[str, torch.Tensor]:
    """A training step's loss: `distillation_loss` of a collated batch (pipeline/data/batches.py: labels,
    loss_mask, teacher_ids, teacher_logprobs, teacher_tail) under a `loss` config group (conf/loss/*.yaml) as a
    dict. With `head`, `student_logits` are the decoder's hidden states and the LM head is fused into the loss
    (`fused_distillation_loss`, `chunk_tokens` positions at a time, at least `chunks` chunks)."""
    args = (batch["labels"], batch["loss_mask"], batch["teacher_ids"], batch["teacher_logprobs"],
            batch["teacher_tail"])
    kwargs = dict(alpha=loss["alpha"], temperature=loss["temperature"], divergence=loss["divergence"],
                  **loss["divergence_kwargs"])
    if head is not None:
        return fused_distillation_loss(student_logits, head, *args, chunk_tokens=chunk_tokens, chunks=chunks,
                                       partitioned=partitioned, **kwargs)
    return distillation_loss(student_logits, *args, **kwargs)


def fused_distillation_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, mask: torch.Tensor,
                            teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor,
                            alpha: float = 0.3, temperature: float = 2.0, divergence: str = "forward_kl",
                            chunk_tokens: int = 1024, chunks: int | None = None, partitioned: bool = False,
                            **divergence_kwargs) -> dict[str, torch.Tensor]:
    """`distillation_loss` of `head(hidden)` with the LM head fused in: the logits of at most `chunk_tokens`
    positions exist at a time, in float32, instead of [B, S, V] and its float32 copies.

    hidden [B, S, H] (the decoder's last hidden states); head the LM head module (a LoRA-wrapped one included);
    the rest as `distillation_loss`. Only scored positions (mask > 0) go through the head. Each chunk's CE and
    divergence sums are taken under activation checkpointing, so its logits are freed after the forward pass and
    recomputed in the backward pass. `chunks`: run at least this many chunks (empty ones cost one row each), for
    ranks whose head calls must match in number (DeepSpeed ZeRO-3 gathers the head's weight at every call).
    `partitioned`: the head's weight is partitioned between calls (DeepSpeed ZeRO-3, whose hooks gather it for the
    recomputation and its backward pass): the checkpoint's check that recomputed tensors match the saved ones,
    which would see the weight's empty placeholder, is left out.
    Returns {"loss", "ce", "kd"} equal to `distillation_loss` on the full logits (to float rounding)."""
    from torch.utils.checkpoint import checkpoint

    def positions(t: torch.Tensor) -> torch.Tensor:  # [B, S, ...] → [B·S, ...]
        return t.flatten(0, 1)

    scored = positions(mask) > 0
    every = (positions(hidden), positions(labels), positions(mask).float(),
             *((positions(teacher_ids), positions(teacher_logprobs), positions(teacher_tail)) if alpha < 1 else ()))
    picked = [t[scored] for t in every]
    padding = [t[:1] for t in every]
    padding[2] = padding[2] * 0  # a row of weight 0
    n = mask.float().sum().clamp(min=1)
    ce_sum = kd_sum = every[0].sum().float() * 0.0  # on the graph: nothing scored still backpropagates
    for i in range(max(math.ceil(picked[0].shape[0] / chunk_tokens), chunks or 0)):
        args = [t[i * chunk_tokens:(i + 1) * chunk_tokens] for t in picked]
        ce_part, kd_part = checkpoint(_chunk_sums, head, temperature, divergence, divergence_kwargs,
                                      *(args if args[0].shape[0] else padding), use_reentrant=False,
                                      determinism_check="none" if partitioned else "default")
        ce_sum, kd_sum = ce_sum + ce_part, kd_sum + kd_part
    ce, kd = ce_sum / n, kd_sum / n
    if alpha >= 1:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    return {"loss": alpha * ce + (1 - alpha) * temperature**2 * kd, "ce": ce, "kd": kd}


def _chunk_sums(head, temperature, divergence, divergence_kwargs, h, y, w, *teacher):
    """Weighted sums of CE and of the divergence over one chunk of positions (the chunk's logits live only here)."""
    logits = head(h).float()
    ce = (F.cross_entropy(logits, y, reduction="none") * w).sum()
    if not teacher:
        return ce, torch.zeros_like(ce)
    ids, lps, tail = teacher
    t_log = temper(teacher_buckets(lps, tail), temperature)
    s_log = temper(student_buckets(logits, ids), temperature)
    # a divergence is a weighted mean; times the chunk's weight it is the chunk's weighted sum
    kd = DIVERGENCES[divergence](t_log, s_log, w, **divergence_kwargs) * w.sum().clamp(min=1)
    return ce, kd
