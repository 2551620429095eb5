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
    assert torch.allclose(skew_kl(t, s, mask, skew=0.0), forward_kl(t, s, mask))
    assert skew_kl(t, s, mask, skew=0.5) < forward_kl(t, s, mask)
    assert torch.allclose(skew_kl(t, s, mask, skew=0.0, reverse=True), reverse_kl(t, s, mask))


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


def _loss_options() -> list[str]:
    from conftest import CONF

    return sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


@pytest.mark.parametrize("option", _loss_options())
def test_every_shipped_loss_trains_the_tiny_student(option, tiny_models, tmp_path):
    """Each conf/loss option, composed and validated as the train stage does and applied by the training step's own
    call (`configured_loss`), trains the tiny student towards the tiny teacher's top-k labels: 30 AdamW steps lower
    the loss. (skew_kl once stopped with a TypeError before its first step: its `alpha` collided with the CE weight.)"""
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from conftest import CONF
    from pipeline.config import train_stage
    from pipeline.losses.kd import configured_loss

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", f"loss={option}"])
    loss = asdict(train_stage(cfg).loss)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    ids = torch.randint(3, teacher.config.vocab_size, (4, 24))
    with torch.no_grad():
        t_ids, t_lps, t_tail = _teacher_topk(teacher(input_ids=ids).logits[:, :-1].double(), k=8)
    batch = {"labels": ids[:, 1:], "loss_mask": torch.ones(4, 23), "teacher_ids": t_ids,
             "teacher_logprobs": t_lps.float(), "teacher_tail": t_tail.float()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    seen = []
    for _ in range(30):
        out = configured_loss(student(input_ids=ids).logits[:, :-1], batch, loss)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(seen))), seen
    assert seen[-1] < 0.8 * seen[0], (option, seen[0], seen[-1])


@pytest.mark.parametrize("kwargs,message", [({"alpha": 0.1}, "does not take"), ({"beta": 0.5}, "does not take")])
def test_divergence_arguments_it_does_not_take_are_one_sentence(kwargs, message):
    from pipeline.config import LossConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        LossConfig(alpha=0.0, divergence="skew_kl", divergence_kwargs=kwargs).validate()


def _full_divergence(name: str, p: torch.Tensor, q: torch.Tensor, **kw) -> torch.Tensor:
    """The divergence written out over the whole vocabulary (p teacher, q student: [..., V] logprobs)."""
    import math

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    def mix(a, b, w):  # log(w·e^a + (1-w)·e^b)
        return torch.logaddexp(a + math.log(w), b + math.log(1 - w))

    if name == "forward_kl":
        return kl(p, q).mean()
    if name == "reverse_kl":
        return kl(q, p).mean()
    if name == "jsd":
        beta = kw["beta"]
        m = mix(p, q, beta)
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)).mean()
    a, b = (q, p) if kw["reverse"] else (p, q)
    return kl(a, mix(a, b, kw["skew"])).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence,kwargs", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
                                               ("skew_kl", {"skew": 0.1, "reverse": False}),
                                               ("skew_kl", {"skew": 0.1, "reverse": True})])
def test_stored_labels_holding_all_the_mass_give_the_exact_divergence(divergence, kwargs, temperature):
    """k = V, through the label codec (encode, store as the label stage does, decode as training does): the tail is
    empty, and every divergence from the stored labels equals the full-vocabulary one of the stored distribution at
    T = 1, 2 and 4 (rel. 1e-4). The codec floors an empty tail at e^-30, which a temperature used to turn into mass
    (e^-7.5 at T = 4) that the student's truly empty tail could never match."""
    import numpy as np

    from pipeline.data.schema import decode_topk, encode_topk

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    rows = []
    for b in range(B):
        logp = torch.log_softmax(teacher[b], -1).numpy()
        ids = np.argsort(-logp, axis=-1)
        enc = encode_topk(ids, np.take_along_axis(logp, ids, -1))
        rows.append(decode_topk(enc["topk_ids"], enc["topk_codes"], enc["top1_logprob"], enc["tail_logprob"], V))
    ids, lps, tail = (torch.from_numpy(np.stack(x)) for x in zip(*rows))
    assert (tail < -29.9).all()  # the codec's floor (moved a little by renormalising): nothing outside the top-k
    mask = torch.ones(B, S)
    out = distillation_loss(student, torch.zeros(B, S, dtype=torch.long), mask, ids, lps, tail, alpha=0.0,
                            temperature=temperature, divergence=divergence, **kwargs)
    stored = torch.full((B, S, V), float("-inf"), dtype=torch.float64).scatter(-1, ids, lps.double())
    p = torch.log_softmax(stored / temperature, -1)
    q = torch.log_softmax(student / temperature, -1)
    exact = _full_divergence(divergence, p, q, **kwargs)
    assert torch.allclose(out["kd"].double(), exact, rtol=1e-4, atol=0), (out["kd"].item(), exact.item())


def _fused_case(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, 16, generator=g, dtype=torch.float64).to(dtype)  # the same values in any dtype
    head = torch.nn.Linear(16, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5)
    ids, lps, tail = _teacher_topk(torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2, k=8)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S)
    mask[0, :2] = 0  # a prompt: not scored
    return hidden, head, labels, mask, ids, lps.to(dtype), tail.to(dtype)


@pytest.mark.parametrize("alpha,divergence,kwargs", [(0.3, "forward_kl", {}), (0.0, "reverse_kl", {}),
                                                     (0.0, "jsd", {"beta": 0.5}), (0.2, "skew_kl", {"skew": 0.1}),
                                                     (1.0, "forward_kl", {})])
def test_the_fused_chunked_loss_gives_the_same_values_and_gradients(alpha, divergence, kwargs):
    """The LM head applied chunk by chunk (3 positions at a time here) under checkpointing: the same loss, CE and
    divergence as `distillation_loss` on the full logits, and the same gradients for the hidden states and the
    head's weight (1e-5)."""
    from pipeline.losses.kd import fused_distillation_loss

    results = []
    for fused in (False, True):
        hidden, head, labels, mask, ids, lps, tail = _fused_case()
        hidden.requires_grad_(True)
        common = dict(alpha=alpha, temperature=2.0, divergence=divergence, **kwargs)
        if fused:
            out = fused_distillation_loss(hidden, head, labels, mask, ids, lps, tail, chunk_tokens=3, **common)
        else:
            out = distillation_loss(head(hidden), labels, mask, ids, lps, tail, **common)
        out["loss"].backward()
        results.append((out, hidden.grad, head.weight.grad))
    (want, want_h, want_w), (got, got_h, got_w) = results
    for key in ("loss", "ce", "kd"):
        assert torch.allclose(got[key].double(), want[key].double(), rtol=1e-5, atol=1e-7), key
    assert torch.allclose(got_h, want_h, rtol=1e-5, atol=1e-8)
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-8)


def test_the_fused_loss_in_bfloat16_matches_float64():
    """The fused loss with a bfloat16 decoder and head, as a GPU runs it (on CPU here: the dtype handling, not the CUDA
    kernels): each chunk's logits come out of the bf16 head and are upcast, so the values and gradients stay within
    bf16's rounding of the float64 ones."""
    from pipeline.losses.kd import fused_distillation_loss

    results = []
    for dtype in (torch.float64, torch.bfloat16):
        hidden, head, labels, mask, ids, lps, tail = _fused_case(dtype=dtype)
        hidden.requires_grad_(True)
        out = fused_distillation_loss(hidden, head, labels, mask, ids, lps.float(), tail.float(), alpha=0.3,
                                      temperature=2.0, chunk_tokens=3)
        out["loss"].backward()
        assert out["loss"].dtype == torch.float32 or dtype == torch.float64
        assert hidden.grad.dtype == dtype and head.weight.grad.dtype == dtype
        results.append((out, hidden.grad.double(), head.weight.grad.double()))
    (want, want_h, want_w), (got, got_h, got_w) = results
    for key in ("loss", "ce", "kd"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=5e-3), key
    for g, w in ((got_h, want_h), (got_w, want_w)):
        assert (g - w).norm() <= 2e-2 * w.norm()


def test_the_fused_loss_with_lora_on_the_lm_head(tiny_models):
    """The tiny student with LoRA on every linear layer and on the LM head: the fused loss from the decoder's hidden
    states through the LoRA-wrapped head gives the values and LoRA gradients of the loss on the model's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.losses.kd import fused_distillation_loss

    g = torch.Generator().manual_seed(3)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "v_proj", "lm_head"]))
        vocab = base.config.vocab_size
        ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
        t_ids, t_lps, t_tail = _teacher_topk(torch.randn(2, 11, vocab, generator=g.manual_seed(2),
                                                         dtype=torch.float64), k=8)
        mask = torch.ones(2, 11)
        args = (ids[:, 1:], mask, t_ids, t_lps.float(), t_tail.float())
        if fused:
            hidden = base.model(input_ids=ids).last_hidden_state[:, :-1]
            out = fused_distillation_loss(hidden, base.lm_head, *args, alpha=0.3, temperature=2.0, chunk_tokens=5)
        else:
            out = distillation_loss(model(input_ids=ids).logits[:, :-1], *args, alpha=0.3, temperature=2.0)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any("lm_head" in n for n in grads)
        results.append((out["loss"].item(), grads))
    (want, want_g), (got, got_g) = results
    assert got == pytest.approx(want, rel=1e-5)
    for name, grad in want_g.items():
        assert torch.allclose(got_g[name], grad, rtol=1e-4, atol=1e-7), name
