"""Student sampling, on-policy distillation, preference pairs and DPO / KTO training, end to end on the session
chain's run root (conftest's `chain`, in the S3 bucket). Its one on-policy round (`run.onpolicy.rounds=1`) has the KD
student (a LoRA adapter on the hub student, merged by the sample stage) sample the corpus's prompts twice each through
vLLM, the hub teacher score every sample (vLLM score mode), and the student train on its samples mixed with the
labels (generalized JSD). Pairs are then built from the chain's labels and those samples, and the hub student is
trained on them with DPO (LoRA under ZeRO-3 with CPU offload: the reference is the base with the adapter switched off)
and with KTO (full fine-tuning under ZeRO-2: the reference is a frozen copy), 2 Ray Train workers each. Both start
from a policy equal to its reference, so their first loss is the objective's value at zero reward (DPO log 2, KTO
0.5) exactly, and must fall from there."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_job
from pipeline.data.schema import SAMPLE_SCHEMA, decode_topk

ROUND = "onpolicy/round_1"


@pytest.fixture(scope="module")
def preference(chain):
    root, args, proc, hub = chain
    uri = next(a for a in args if a.startswith("paths.run_root=")).split("=", 1)[1]
    args = [*args, f"paths.samples_dir={uri}/{ROUND}/samples"]
    paired = run_job("pairs.py", *args, env=hub["env"])
    return root, args, hub, proc, paired


def _table(folder):
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


def test_the_student_samples_each_prompt_n_times_and_the_teacher_scores_every_token(preference):
    import torch
    from transformers import AutoModelForCausalLM

    root, _, _, sampled, _ = preference
    samples = _table(root / ROUND / "samples")
    assert samples.schema.equals(SAMPLE_SCHEMA)
    labels = _table(root / "labels")
    rejected = list((root / ROUND / "samples" / "rejected").glob("part-*.parquet"))
    by_id: dict[str, list[int]] = {}
    for rid, j in zip(samples.column("id").to_pylist(), samples.column("sample").to_pylist()):
        by_id.setdefault(rid, []).append(j)
    assert not rejected and set(by_id) == set(labels.column("id").to_pylist())  # the chain labeled every row
    assert all(sorted(js) == [0, 1] for js in by_id.values())
    manifest = json.loads((root / ROUND / "samples" / "manifest.json").read_text())
    assert manifest["generator"]["n"] == 2 and manifest["generator"]["student"]["name_or_path"].endswith(
        "/student/adapter") and manifest["generator"]["student"]["base"] == "ray-distill/tiny-student"
    assert manifest["mode"] == "score" and manifest["summary"]["samples"] == samples.num_rows
    assert f"sample: prompts read {len(by_id)} = sampled {len(by_id)} + rejected 0" in sampled.stdout
    # the stored teacher scores are the teacher's (the chain's SFT teacher): its log-probability of each sampled
    # token under transformers
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher_sft" / "student" / "model",
                                                   dtype=torch.float32).eval()
    k = manifest["k"]
    for row in samples.slice(0, 6).to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids).logits[0, :-1].double(), -1)
        first = len(row["prompt_ids"]) - 1
        expected = logp[first:first + len(row["response_ids"])].gather(
            -1, torch.tensor(row["response_ids"])[:, None])[:, 0].numpy()
        assert np.allclose(np.asarray(row["token_logprob"], np.float64), expected, atol=0.02), row["id"]
        top_ids, top_lps, _ = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprob"],
                                          row["tail_logprob"], k)
        best = logp[first:first + len(row["response_ids"])].topk(k).indices.numpy()
        assert np.mean([set(a) == set(b) for a, b in zip(top_ids.tolist(), best.tolist())]) > 0.8  # near-ties swap


def test_an_on_policy_round_trains_the_kd_student_on_its_own_samples_and_lowers_heldout_kl(preference):
    """The round starts from the KD student (its adapter merged into the hub base, so its held-out figures on the
    labels are the KD student's last) and lowers the KL to the teacher on the held-out prompts' samples: the
    student's own distribution, which on-policy distillation trains on. (On the teacher's own responses it moved
    4.885 → 4.938 in a measured run: on these tiny models the round trades a little of the offline fit for it.)"""
    root, _, _, proc, _ = preference
    kd = [json.loads(x) for x in (root / "student" / "eval.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (root / ROUND / "student" / "eval.jsonl").read_text().splitlines()]
    on_labels = [r for r in records if "on" not in r]
    on_samples = [r for r in records if r.get("on") == "samples"]
    assert on_labels[0]["kl_to_teacher"] == pytest.approx(kd[-1]["kl_to_teacher"], rel=1e-2)
    assert on_samples[0]["step"] == 0 and on_samples[-1]["step"] > 0
    assert on_samples[-1]["kl_to_teacher"] < on_samples[0]["kl_to_teacher"], on_samples
    assert "of them the student's own samples" in proc.stdout
    lineage = json.loads((root / ROUND / "student" / "lineage.json").read_text())
    assert lineage["train"]["onpolicy_fraction"] == 0.5 and lineage["loss"]["divergence"] == "jsd"
    assert lineage["student_base"].endswith(f"{ROUND}/samples/student")


def test_pairs_put_the_teachers_response_against_the_student_sample_it_scores_lowest(preference):
    root, _, _, _, paired = preference
    pairs = _table(root / "pairs").to_pylist()
    labels = {r["id"]: r for r in _table(root / "labels").to_pylist()}
    samples: dict[str, list[dict]] = {}
    for r in _table(root / ROUND / "samples").to_pylist():
        samples.setdefault(r["id"], []).append(r)
    manifest = json.loads((root / "pairs" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["pairs"] == len(pairs) > 0 and counts["prompts"] == len(labels) == len(samples)
    assert len(pairs) + counts["identical_dropped"] + counts["repeated_samples"] >= counts["prompts"]
    for p in pairs:
        assert p["chosen_ids"] == labels[p["id"]]["response_ids"] and p["rejected_ids"] != p["chosen_ids"]
        distinct = [s for s in samples[p["id"]] if s["response_ids"] != p["chosen_ids"]]
        lowest = min(distinct, key=lambda s: (np.mean(s["token_logprob"]), s["sample"]))
        assert p["sample"] == lowest["sample"] and p["rank"] == 0
    assert manifest["labels"] == json.loads((root / "labels" / "manifest.json").read_text())["fingerprint"]
    assert f"pairs: {len(pairs)} pairs from {counts['prompts']} prompts" in paired.stdout


@pytest.mark.parametrize("objective,overrides,start", [
    ("dpo", ["deepspeed=zero3_offload", "train.lr=1e-2"], math.log(2)),
    ("kto", ["train.method=full", "deepspeed=zero2", "train.lr=1e-3"], 0.5),
])
def test_dpo_and_kto_lower_their_loss_against_the_frozen_starting_student(preference, objective, overrides, start):
    root, args, hub, _, _ = preference
    uri = next(a for a in args if a.startswith("paths.run_root=")).split("=", 1)[1]
    chain_args = [a for a in args if not a.startswith(("deepspeed=", "train.loss_chunk_tokens=", "train.lr="))]
    proc = run_job("train.py", *chain_args, f"loss={objective}", "train.max_steps=6",
                   f"paths.student_dir={uri}/student_{objective}", f"paths.train_storage={uri}/train_{objective}",
                   *overrides, env=hub["env"])
    assert f"pairs ({objective})" in proc.stdout
    steps = [json.loads(x) for x in (root / f"student_{objective}" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 7))
    # step 1: the policy is the reference (a fresh adapter, or the frozen copy's own weights), so every reward is 0
    assert steps[0]["loss"] == pytest.approx(start, abs=1e-4) and steps[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1e-3 and steps[-1]["reward_margin"] > 0, steps
    lineage = json.loads((root / f"student_{objective}" / "lineage.json").read_text())
    assert lineage["loss"]["objective"] == objective and lineage["pairs_dir"] == f"{uri}/pairs"
