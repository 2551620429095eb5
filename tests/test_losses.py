"""Mathematical properties of the sparse KD losses (pure tensors, no models)."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses.kd import (bucket_logprobs, distillation_loss, forward_kl, generalized_jsd, hard_ce,
                                reverse_kl, skew_kl, student_buckets, temper)

B, S, V = 2, 5, 50


def _teacher_topk(logits: torch.Tensor, k: int):
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1).clamp(min=-1e4)
    return top.indices, top.values, tail


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2,
            torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2,
            torch.ones(B, S), torch.randint(0, V, (B, S), generator=g))


def _buckets(student, teacher, k, temperature=1.0):
    ids, lps, tail = _teacher_topk(teacher, k)
    return (temper(bucket_logprobs(lps, tail), temperature), temper(student_buckets(student, ids), temperature))


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd, skew_kl])
def test_zero_for_identical_distributions(fn, tensors):
    _, teacher, mask, _ = tensors
    t, s = _buckets(teacher, teacher, k=8)
    assert fn(t, s, mask).abs() < 1e-6


def test_jsd_symmetric_at_half_and_kl_at_the_ends(tensors):
    student, teacher, mask, _ = tensors
    t, s = _buckets(student, teacher, k=8)
    assert torch.allclose(generalized_jsd(t, s, mask, 0.5), generalized_jsd(s, t, mask, 0.5))
    assert torch.allclose(generalized_jsd(t, s, mask, 0.0), forward_kl(t, s, mask))
    assert torch.allclose(generalized_jsd(t, s, mask, 1.0), reverse_kl(t, s, mask))
    # and the mixture form approaches those ends continuously (scaled by β near 0)
    assert generalized_jsd(t, s, mask, 1e-4) / 1e-4 == pytest.approx(forward_kl(t, s, mask).item(), rel=1e-2)


def test_topk_with_k_equal_vocab_is_exact_full_kl(tensors):
    student, teacher, mask, _ = tensors
    for temperature in (1.0, 2.0):
        t, s = _buckets(student, teacher, k=V, temperature=temperature)
        p = torch.log_softmax(teacher / temperature, -1)
        q = torch.log_softmax(student / temperature, -1)
        exact = (p.exp() * (p - q)).sum(-1).mean()
        assert torch.allclose(forward_kl(t, s, mask), exact, atol=1e-6)


def test_skew_kl_at_zero_is_kl_and_bounded_otherwise(tensors):
    student, teacher, mask, _ = tensors
    t, s = _buckets(student, teacher, k=8)
    assert torch.allclose(skew_kl(t, s, mask, alpha=0.0), forward_kl(t, s, mask))
    assert skew_kl(t, s, mask, alpha=0.5) < forward_kl(t, s, mask)
    assert torch.allclose(skew_kl(t, s, mask, alpha=0.0, reverse=True), reverse_kl(t, s, mask))


def test_alpha_one_is_plain_ce_and_mask_excludes_positions(tensors):
    student, teacher, mask, labels = tensors
    ids, lps, tail = _teacher_topk(teacher, 8)
    out = distillation_loss(student, labels, mask, ids, lps, tail, alpha=1.0)
    assert torch.allclose(out["loss"], hard_ce(student, labels, mask))
    half = mask.clone()
    half[:, 3:] = 0
    a = distillation_loss(student, labels, half, ids, lps, tail)
    b = distillation_loss(student[:, :3], labels[:, :3], half[:, :3], ids[:, :3], lps[:, :3], tail[:, :3])
    assert torch.allclose(a["loss"], b["loss"])


def test_reference_combination_and_gradient_flows(tensors):
    student, teacher, mask, labels = tensors
    student = student.clone().requires_grad_(True)
    ids, lps, tail = _teacher_topk(teacher, 8)
    out = distillation_loss(student, labels, mask, ids, lps, tail, alpha=0.3, temperature=2.0)
    assert torch.allclose(out["loss"], 0.3 * out["ce"] + 0.7 * 4.0 * out["kd"])
    out["loss"].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
