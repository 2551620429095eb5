"""Labeled rows → training batches: the teacher's distributions land on the positions whose logits predict
the response tokens, padding is masked, and the prompt (never the response) is cut to fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.schema import encode_topk
from pipeline.data.batches import collate

K = 3


def _row(prompt, response, rng):
    ids = np.stack([rng.choice(50, K, replace=False) for _ in response])
    lps = np.log(np.full((len(response), K), 0.2))
    enc = encode_topk(ids, lps)
    return {"prompt_ids": prompt, "response_ids": response, **enc}, np.sort(ids, axis=1)


def _batch(rows):
    return {c: np.array([r[c] for r in rows] + [None], dtype=object)[:-1] for c in rows[0]}


def test_teacher_positions_align_with_shifted_logits():
    rng = np.random.default_rng(0)
    a, a_ids = _row([1, 2, 3], [10, 11], rng)
    b, b_ids = _row([4, 5], [12, 13, 14, 15], rng)
    out = collate(_batch([a, b]), k=K, max_seq_len=64, pad_id=0)
    assert out["input_ids"].shape == (2, 6)
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    # row a: logits at positions 2, 3 predict response tokens 10, 11
    assert out["loss_mask"][0].tolist() == [0, 0, 1, 1, 0]
    assert out["labels"][0, 2:4].tolist() == [10, 11]
    assert torch.equal(out["teacher_ids"][0, 2:4], torch.from_numpy(a_ids))
    assert out["loss_mask"][1].tolist() == [0, 1, 1, 1, 1]
    assert torch.equal(out["teacher_ids"][1, 1:5], torch.from_numpy(b_ids))
    probs = out["teacher_logprobs"][1, 1].exp().sum() + out["teacher_tail"][1, 1].exp()
    assert probs == pytest.approx(1.0, abs=1e-5)


def test_long_rows_lose_prompt_tokens_not_response_tokens():
    rng = np.random.default_rng(1)
    row, _ = _row(list(range(1, 11)), [20, 21, 22], rng)
    out = collate(_batch([row]), k=K, max_seq_len=6, pad_id=0)
    assert out["input_ids"][0].tolist() == [8, 9, 10, 20, 21, 22]
    assert out["labels"][0][out["loss_mask"][0] == 1].tolist() == [20, 21, 22]
    with pytest.raises(ValueError, match="does not fit"):
        collate(_batch([row]), k=K, max_seq_len=3, pad_id=0)


def test_a_capped_training_set_is_fixed_by_the_row_ids():
    """train.max_rows keeps the same rows for any labels of one corpus (KD and SFT students see the same ones)."""
    from pipeline.data.split import is_heldout, training_ids

    ids = [f"sort-0-{i}" for i in range(1000)]
    keep = training_ids(ids, 0.1, 250)
    assert len(keep) == 250 and not any(is_heldout(i, 0.1) for i in keep)
    assert training_ids(list(reversed(ids)), 0.1, 250) == keep  # order of the shards does not matter
    assert training_ids(ids[:10] + ids[10:], 0.1, 400) >= keep  # a larger cap keeps every row of a smaller one
    assert training_ids(ids, 0.1, None) is None  # uncapped: every non-held-out row
    assert len(training_ids(ids[:50], 0.1, 250)) == sum(not is_heldout(i, 0.1) for i in ids[:50])


def test_a_single_process_runs_zero_1_and_2_as_stage_0():
    """One rank has nothing to partition: ZeRO-1/2 run as stage 0 there (offload and ZeRO-3 are kept)."""
    from types import SimpleNamespace

    from pipeline.train.worker import deepspeed_config

    def stage(zero: dict, world_size: int) -> int:
        spec = SimpleNamespace(deepspeed={"zero_optimization": zero}, micro_batch_size=4,
                               gradient_accumulation_steps=1, grad_clip=1.0, precision="fp32")
        return deepspeed_config(spec, world_size)["zero_optimization"]["stage"]

    assert stage({"stage": 2}, 1) == 0 and stage({"stage": 1}, 1) == 0
    assert stage({"stage": 2}, 2) == 2 and stage({"stage": 3}, 1) == 3
    assert stage({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 1) == 2


def test_replayed_epochs_are_seeded_permutations_of_the_kept_rows():
    """Each epoch after the first replays every kept row once, in an order fixed by (seed, rank, epoch)."""
    from pipeline.train.worker import ShardEpochs

    epochs = ShardEpochs(shard=None, size=4, budget_mb=1, seed=(0, 1))
    epochs.kept = [{"id": np.array([f"r{i}" for i in range(j, j + 4)]), "ids": np.arange(j, j + 4)[:, None]}
                   for j in range(0, 12, 4)] + [{"id": np.array(["r12"]), "ids": np.array([np.array([12])], dtype=object)}]
    first = [b["id"] for b in epochs.next(1)]
    assert [len(b) for b in first] == [4, 4, 4, 1]
    flat = [x for b in first for x in b]
    assert sorted(flat) == sorted(f"r{i}" for i in range(13)) and flat != [f"r{i}" for i in range(13)]
    assert [b["id"] for b in epochs.next(1)] == first  # the same epoch again: the same order (resume)
    assert [b["id"] for b in epochs.next(2)] != first
    assert all(int(r[1:]) == int(v[0]) for b in epochs.next(3) for r, v in zip(b["id"], b["ids"]))  # rows stay whole
    other = ShardEpochs(shard=None, size=4, budget_mb=1, seed=(0, 1))
    other.kept = list(reversed(epochs.kept))  # read in another order: the same epochs
    assert [b["id"] for b in other.next(1)] == first
