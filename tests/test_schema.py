"""The soft-label codec and the labeled-Parquet contract (pure numpy/pyarrow, no engines)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.schema import (LABEL_SCHEMA, LOGPROB_STEP, Manifest, decode_topk, encode_topk,
                                  stored_kl_error, validate_labels_table)
from pipeline.errors import LabelsError


def _topk(rng, positions=64, vocab=151_936, k=20, scale=3.0):
    logits = rng.standard_normal((positions, vocab)) * scale
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argpartition(-lp, k, axis=1)[:, :k]
    return ids, np.take_along_axis(lp, ids, 1)


@pytest.mark.parametrize("scale", [0.05, 3.0, 8.0])
def test_codec_round_trip_keeps_ids_exact_and_kl_under_1e3(scale):
    ids, lps = _topk(np.random.default_rng(0), scale=scale)
    enc = encode_topk(ids, lps)
    dec_ids, dec_lp, dec_tail = decode_topk(enc["topk_ids"], enc["topk_codes"], enc["top1_logprob"],
                                            enc["tail_logprob"], k=20)
    assert np.array_equal(dec_ids, np.sort(ids, axis=1))
    # decoded distribution (top-k + tail bucket) sums to one
    np.testing.assert_allclose(np.exp(dec_lp).sum(1) + np.exp(dec_tail), 1.0, atol=1e-5)
    # up to one shift per position (anchor and renormalisation), every logprob is within half a code step
    exact = np.take_along_axis(lps, np.argsort(ids, axis=1), axis=1)
    err = exact - dec_lp
    assert (err.max(axis=1) - err.min(axis=1)).max() <= LOGPROB_STEP + 1e-5
    assert stored_kl_error(ids, lps) < 1e-3


def test_codec_is_compact():
    ids, lps = _topk(np.random.default_rng(1), positions=10)
    enc = encode_topk(ids, lps)
    assert len(enc["topk_ids"]) == 3 * 10 * 20 and len(enc["topk_codes"]) == 10 * 20


def test_validate_labels_table_names_the_bad_column():
    table = pa.table({"id": ["a"]})
    with pytest.raises(LabelsError, match="no column 'source'"):
        validate_labels_table(table, "shard.parquet")
    empty = pa.Table.from_pylist([], schema=LABEL_SCHEMA)
    validate_labels_table(empty, "ok")


def test_manifest_fingerprint_ignores_paths_and_versions_only():
    base = dict(teacher={"name_or_path": "t"}, tokenizer_sha256="a", chat_template_sha256="b", vocab_size=10,
                special_tokens={}, k=20, mode="generate", logprobs_mode="raw_logprobs", max_prompt_tokens=8,
                max_response_tokens=8, max_model_len=32, sampling={}, inputs=["x"], packages={"vllm": "1"})
    m = Manifest(**base)
    assert Manifest(**{**base, "inputs": ["y"], "packages": {}}).fingerprint() == m.fingerprint()
    assert Manifest(**{**base, "k": 10}).fingerprint() != m.fingerprint()
    assert Manifest.from_json(m.to_json()) == m
