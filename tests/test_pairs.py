"""Preference pairs from labels and samples (`build_pairs`) and their training batches (`collate_pairs`), on
hand-made tables: no engine, no Ray."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.data.batches import collate_pairs
from pipeline.errors import LabelsError
from pipeline.preference.pairs import build_pairs


def _labels(rows):
    return pa.table({"id": [r[0] for r in rows], "prompt_ids": [r[1] for r in rows],
                     "response_ids": [r[2] for r in rows], "token_logprob": [r[3] for r in rows]})


def _samples(rows):
    table = _labels([r[:4] for r in rows])
    return table.append_column("sample", pa.array([r[4] for r in rows], pa.int32()))


def test_pairs_take_the_lowest_scored_distinct_samples_and_drop_identical_ones():
    labels = _labels([("a", [1, 2], [7, 8], [-0.1, -0.1]), ("b", [3], [9], [-0.2]), ("c", [4], [5], [-0.3])])
    samples = _samples([
        ("a", [1, 2], [7, 8], [-0.1, -0.1], 0),  # identical to the teacher's response: dropped
        ("a", [1, 2], [6], [-3.0], 1),  # the teacher's least favourite: rank 0
        ("a", [1, 2], [6, 6], [-1.0, -2.0], 2),  # mean -1.5: rank 1
        ("a", [1, 2], [6], [-3.0], 3),  # repeats sample 1
        ("b", [3], [9], [-0.2], 0),  # b's only sample equals its label: no pair
    ])
    table, counts = build_pairs(labels, samples, per_prompt=2)
    rows = table.to_pylist()
    assert [(r["id"], r["sample"], r["rank"]) for r in rows] == [("a", 1, 0), ("a", 2, 1)]
    assert rows[0]["chosen_ids"] == [7, 8] and rows[0]["rejected_ids"] == [6] and rows[0]["prompt_ids"] == [1, 2]
    assert rows[0]["rejected_score"] == pytest.approx(-3.0) and rows[1]["rejected_score"] == pytest.approx(-1.5)
    assert rows[0]["chosen_score"] == pytest.approx(-0.1)
    assert counts == {"prompts": 2, "pairs": 2, "identical_dropped": 2, "repeated_samples": 1, "without_samples": 1,
                      "samples_without_labels": 0}
    one, _ = build_pairs(labels, samples, per_prompt=1)
    assert one.column("sample").to_pylist() == [1]


def test_samples_of_another_prompt_are_refused():
    labels = _labels([("a", [1, 2], [7], [-0.1])])
    with pytest.raises(LabelsError, match="different corpora or tokenizers"):
        build_pairs(labels, _samples([("a", [1, 3], [6], [-1.0], 0)]), per_prompt=1)


def test_collated_pairs_score_only_the_completions_and_kto_shifts_them_across_prompts():
    batch = {"prompt_ids": [[1, 2, 3], [4]], "chosen_ids": [[5, 6], [7]], "rejected_ids": [[8], [9, 10, 11]]}
    out = collate_pairs(batch, max_seq_len=16, pad_id=0, mismatched=True)
    assert out["input_ids"].shape == (4, 5)
    assert out["input_ids"][0].tolist() == [1, 2, 3, 5, 6] and out["input_ids"][3].tolist() == [4, 9, 10, 11, 0]
    # positions predicting completion tokens: chosen 0 from position 2 (predicts 5) for 2 tokens
    assert out["loss_mask"][0].tolist() == [0, 0, 1, 1] and out["labels"][0, 2:].tolist() == [5, 6]
    assert out["loss_mask"][3].tolist() == [1, 1, 1, 0]
    assert out["loss_mask"].sum(-1).tolist() == [2, 1, 1, 3]
    # KTO's mismatched sequences: each prompt with the completion before it (cyclically): prompt 0 gets [9, 10, 11]
    assert out["kl_input_ids"][0].tolist() == [1, 2, 3, 9, 10, 11] and out["kl_input_ids"][1].tolist()[:3] == [4, 5, 6]
    assert torch.equal(out["kl_loss_mask"].sum(-1), torch.tensor([3.0, 2.0, 1.0, 1.0]))


def test_capped_pairs_train_on_the_labels_transfer_set(tmp_path):
    """train.max_rows picks the transfer set among the labels' ids, so DPO or KTO on pairs made from them trains on the
    prompts the KD student was distilled on (those that made a pair), not on the first prompts among the pairs."""
    import pyarrow.parquet as pq
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline.config import train_stage
    from pipeline.data.split import training_ids
    from pipeline.train.stage import training_sources

    label_ids = [f"row-{i}" for i in range(400)]
    pair_ids = [i for i in label_ids[::3] for _ in range(2)]  # a third of the prompts, two pairs each
    pq.write_table(pa.table({"id": label_ids}), tmp_path / "labels.parquet")
    pq.write_table(pa.table({"id": pair_ids}), tmp_path / "pairs.parquet")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "loss=dpo",
                                           "train.max_rows=60", "heldout_fraction=0.1"])
    stage = train_stage(cfg)
    [(files, kept)] = training_sources(stage, [str(tmp_path / "pairs.parquet")], None,
                                       labels=[str(tmp_path / "labels.parquet")])
    transfer = training_ids(label_ids, 0.1, 60)
    assert kept == [i for i in pair_ids if i in transfer] and 0 < len(set(kept)) < 60
    assert training_ids(list(dict.fromkeys(pair_ids)), 0.1, 60) != set(kept)  # what it was: the pairs' first 60
