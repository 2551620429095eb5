"""Preference losses as pure functions of sequence log-probabilities: DPO (and its sigmoid, hinge, IPO and robust
variants) and KTO, as TRL defines them (tests/test_preference_losses.py checks both against TRL's trainers on the same
tensors).

A pair is (prompt, chosen, rejected): here chosen is the teacher's response and rejected the student's own sample
(pipeline/preference). The reference model is the starting student, frozen; its log-probabilities come from a
second forward pass with the LoRA adapter switched off, or from a frozen copy of the starting weights.

Shapes: B pairs (DPO) or B completions (KTO); every input is a [B] tensor of summed token log-probabilities of the
completion, except the token counts, which IPO's length normalisation needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_VARIANTS = ("sigmoid", "hinge", "ipo", "robust")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the scored positions of log p(label): logits [B, S, V], labels and mask [B, S] → [B]."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logps * mask.to(logps.dtype)).sum(-1)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, variant: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Direct preference optimisation: with the implicit rewards r = β·(log π − log π_ref) of each side,

    sigmoid: −log σ(r_c − r_r) (the DPO paper); hinge: max(0, 1 − (r_c − r_r)) (SLiC); robust: the sigmoid loss
    de-biased for a `label_smoothing` share of flipped pairs (rDPO); ipo: (Δ/len − 1/(2β))² over the length-averaged
    log-ratios (IPO, which needs `chosen_tokens` and `rejected_tokens`).
    Returns {"loss" (mean over pairs), "chosen_reward", "rejected_reward", "reward_accuracy"} (rewards detached)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if variant == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif variant == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif variant == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif variant == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO averages the log-ratios over each completion's tokens: pass chosen_tokens and "
                             "rejected_tokens.")
        average = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (average - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO variant {variant!r} is not one of {DPO_VARIANTS}.")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return {"loss": losses.mean(), "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean()}


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: the batch's estimate of KL(π ‖ π_ref) from mismatched (prompt, completion) pairs
    (each prompt with another row's completion), clamped at 0 and detached, as TRL computes it."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Kahneman–Tversky optimisation (KTO paper, eq. 7): each completion is desirable (the teacher's) or undesirable
    (the student's) on its own, no pairing needed. With r = log π − log π_ref and the reference point `kl`
    (`kto_reference_point`): a desirable completion costs w_d·(1 − σ(β(r − z₀))), an undesirable one
    w_u·(1 − σ(β(z₀ − r))); the loss is their mean.
    Returns {"loss", "chosen_reward", "rejected_reward", "reward_accuracy"} (rewards detached; a side with no
    completions in the batch has reward 0)."""
    ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    reward = beta * ratio.detach()

    def mean(values: torch.Tensor) -> torch.Tensor:
        return values.mean() if values.numel() else torch.zeros((), dtype=values.dtype)

    chosen, rejected = mean(reward[desirable]), mean(reward[~desirable])
    return {"loss": losses.mean(), "chosen_reward": chosen, "rejected_reward": rejected,
            "reward_accuracy": (chosen > rejected).float()}
