"""The DPO and KTO losses against TRL's trainers on the same tensors, and their properties (pure tensors, no models).

TRL computes these losses inside `DPOTrainer._compute_loss` and `KTOTrainer._compute_loss`, from a model's
per-token log-probabilities; here those methods run on a stand-in trainer and a stand-in model whose output *is*
the given per-token log-probabilities, with the reference log-probabilities precomputed, so both sides see exactly
the same numbers. The stand-ins replace a forward pass only: every line of TRL's loss arithmetic runs as shipped.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipeline.losses.preference import dpo_loss, kto_loss, kto_reference_point, sequence_logprobs

B, S = 4, 7


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _model_returning(per_token_logps: torch.Tensor):
    """A stand-in for TRL's fused-LM-head model call: its output is the given [N, S-1] token log-probabilities."""
    n, width = per_token_logps.shape

    def model(**kwargs):  # noqa: ARG001 - TRL passes input_ids, attention_mask, labels, ...
        return SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n, width),
                               mean_logits=torch.zeros(n, width), is_top1=torch.zeros(n, width, dtype=torch.bool))

    return model


def _trainer(**attrs):
    metrics = defaultdict(lambda: defaultdict(list))
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
                           precompute_ref_logps=True, _metrics=metrics, _total_train_tokens=0, _tp_size=1, **attrs)


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2 * B, S, dtype=torch.long)
    mask[:, :2] = 0  # the prompt
    mask[1, -2:] = 0  # a shorter chosen completion
    mask[B + 2, -3:] = 0  # and a shorter rejected one
    token_logps = -torch.rand(2 * B, S - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = (token_logps + torch.randn(2 * B, S - 1, generator=g, dtype=torch.float64) * 0.3 * mask[:, 1:]).sum(-1)
    return mask, token_logps, ref


@pytest.mark.parametrize("variant,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_equals_trl(variant, smoothing, pairs):
    from trl.trainer.dpo_trainer import DPOTrainer

    mask, token_logps, ref = pairs
    beta = 0.3
    trainer = _trainer(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[variant], loss_weights=[1.0],
                       beta=beta, label_smoothing=smoothing, use_weighting=False)
    inputs = {"input_ids": torch.zeros(2 * B, S, dtype=torch.long), "attention_mask": torch.ones(2 * B, S),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    theirs = DPOTrainer._compute_loss(trainer, _model_returning(token_logps), inputs, False)
    logps, tokens = token_logps.sum(-1), mask[:, 1:].sum(-1).double()
    ours = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, variant=variant, label_smoothing=smoothing,
                    chosen_tokens=tokens[:B], rejected_tokens=tokens[B:])
    assert ours["loss"].item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)
    assert ours["reward_accuracy"].item() == pytest.approx(trainer._metrics["train"]["rewards/accuracies"][-1])
    assert ours["chosen_reward"].item() == pytest.approx(trainer._metrics["train"]["rewards/chosen"][-1])


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(weights, pairs):
    from trl.trainer.kto_trainer import KTOTrainer

    mask, token_logps, ref = pairs
    g = torch.Generator().manual_seed(1)
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    # the mismatched completions' log-probabilities, policy above reference so the reference point is positive
    kl_logps = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 5
    ref_kl_logps = kl_logps - torch.rand(2 * B, generator=g, dtype=torch.float64)
    beta = 0.2
    trainer = _trainer(calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
                       undesirable_weight=weights[1])
    trainer._compute_kl_logps = lambda model, batch: kl_logps  # noqa: ARG005 - the mismatched pairs' forward pass
    inputs = {"input_ids": torch.zeros(2 * B, S, dtype=torch.long), "attention_mask": torch.ones(2 * B, S),
              "completion_mask": mask, "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl_logps}
    theirs = KTOTrainer._compute_loss(trainer, _model_returning(token_logps), inputs, False)
    z0 = kto_reference_point(kl_logps, ref_kl_logps)
    assert z0.item() > 0
    ours = kto_loss(token_logps.sum(-1), ref, desirable, z0, beta=beta, desirable_weight=weights[0],
                    undesirable_weight=weights[1])
    assert ours["loss"].item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)


def test_dpo_is_log2_at_the_reference_and_falls_as_the_margin_grows():
    logps = torch.tensor([-5.0, -7.0])
    at_ref = dpo_loss(logps, logps, logps, logps, beta=0.1)
    assert at_ref["loss"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    better = dpo_loss(logps + 1, logps - 1, logps, logps, beta=0.1)
    assert better["loss"] < at_ref["loss"] and better["reward_accuracy"].item() == 1.0


def test_kto_reference_point_is_never_negative_and_no_gradient_flows():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.tensor([-1.0, -1.0]))
    assert z0.item() == 0.0 and not z0.requires_grad


def test_sequence_logprobs_sums_only_the_scored_positions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=g)
    labels = torch.randint(0, 11, (2, 3), generator=g)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 1, labels[0, 1]] + logp[0, 2, labels[0, 2]], logp[1, 0, labels[1, 0]]])
    assert torch.allclose(sequence_logprobs(logits, labels, mask), expected)


def test_an_unknown_variant_and_ipo_without_lengths_are_one_sentence():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="not one of"):
        dpo_loss(x, x, x, x, variant="nope")
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, variant="ipo")
