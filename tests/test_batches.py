"""Labeled rows → training batches: the teacher's distributions land on the positions whose logits predict
the response tokens, padding is masked, and the prompt (never the response) is cut to fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.schema import encode_topk
from pipeline.train.batches import collate

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
