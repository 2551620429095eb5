"""Ulysses sequence parallelism: 2 gloo ranks splitting each sequence give the unsplit loss and gradients, with the
loss on the model's logits and with the LM head fused into the loss (pipeline/losses/kd.py).

Real DeepSpeed `UlyssesSPAttentionHF` all-to-alls over a real 2-process gloo group, on a tiny Qwen2 with
more query heads than key/value heads (the replicated-kv path), right-padded rows of different lengths and
an odd sequence length (so the split pads).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.losses.kd import distillation_loss, fused_distillation_loss
from pipeline.train import sequence_parallel as sp

K, B = 8, 3
LOSS = dict(alpha=0.3, temperature=2.0, divergence="forward_kl")


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """A collated batch (pipeline.data.batches.collate's layout) with a random sparse teacher."""
    g = torch.Generator().manual_seed(0)
    lengths, length = [23, 17, 9], 23
    input_ids = torch.zeros(B, length, dtype=torch.long)
    attention = torch.zeros(B, length, dtype=torch.long)
    mask = torch.zeros(B, length - 1)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        attention[i, :n] = 1
        mask[i, n // 3:n - 1] = 1  # the "response" part of each row
    logp = torch.log_softmax(torch.randn(B, length - 1, vocab, generator=g) * 3, -1)
    top = logp.topk(K, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1).clamp(min=-1e4)
    return dict(input_ids=input_ids, attention_mask=attention, labels=input_ids[:, 1:].clone(), loss_mask=mask,
                teacher_ids=top.indices, teacher_logprobs=top.values, teacher_tail=tail)


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


def _loss(model, batch, logits):
    return distillation_loss(logits, batch["labels"], batch["loss_mask"], batch["teacher_ids"],
                             batch["teacher_logprobs"], batch["teacher_tail"], **LOSS)["loss"]


def _rank(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist

    from pipeline.train.worker import skip_shm_comm_build

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    model = _load(model_dir)
    sp.register(model, 2, B)
    full = _batch(model.config.vocab_size)
    part = sp.split(full, rank, 2, B)
    results = {}
    for fused in (False, True):  # the loss on the model's logits; the LM head fused into the loss, 4 rows a chunk
        inputs = dict(input_ids=part["input_ids"], position_ids=part["position_ids"])
        if fused:
            hidden = model.model(**inputs).last_hidden_state
            loss = fused_distillation_loss(hidden, model.lm_head, part["labels"], part["loss_mask"],
                                           part["teacher_ids"], part["teacher_logprobs"], part["teacher_tail"],
                                           chunk_tokens=4, **LOSS)["loss"]
        else:
            loss = _loss(model, part, model(**inputs).logits)
        loss = loss * sp.loss_weight(part["loss_mask"], part["total_tokens"])
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        for g in grads.values():
            dist.all_reduce(g)
        total = loss.detach().clone()
        dist.all_reduce(total)
        results[fused] = {"loss": total, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from pipeline.models.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("sp")
    build_tokenizer(root / "tok")
    build_model(root / "model", root / "tok", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                initializer_range=0.2)
    return str(root / "model")


def test_split_pads_to_a_multiple_and_keeps_targets_aligned():
    batch = _batch(100)
    parts = [sp.split(batch, r, 2, 4) for r in range(2)]
    assert parts[0]["input_ids"].shape == (4, 12)  # 23 tokens → 24 = 2 × 12, batch padded to 4 rows
    joined = torch.cat([p["labels"] for p in parts], 1)
    assert torch.equal(joined[:B, :22], batch["labels"])
    assert torch.equal(torch.cat([p["position_ids"] for p in parts], 1)[0], torch.arange(24))
    assert float(parts[0]["total_tokens"]) == float(batch["loss_mask"].sum())
    assert sum(sp.loss_weight(p["loss_mask"], p["total_tokens"]) for p in parts) == pytest.approx(1.0)


def test_two_ranks_match_the_unsplit_loss_and_gradients(student_dir, tmp_path):
    model = _load(student_dir)
    batch = _batch(model.config.vocab_size)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    reference = _loss(model, batch, logits)
    reference.backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank, args=(port, student_dir, out), nprocs=2, start_method="spawn", join=True)
    for fused, split in torch.load(out).items():  # the loss on full logits, and the fused chunked loss
        assert split["loss"].item() == pytest.approx(reference.item(), rel=1e-5), fused
        for name, p in model.named_parameters():
            torch.testing.assert_close(split["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {fused}")


def test_heads_that_do_not_split_are_refused():
    assert sp.check_heads(4, 1, 2, "m") is None
    assert "does not divide the 3 attention heads" in sp.check_heads(3, 3, 2, "m")
    assert "key/value heads" in sp.check_heads(12, 3, 4, "m")
