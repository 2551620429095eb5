"""The pairs stage: preference pairs from the teacher's labels and the student's samples, on CPU in the driver.

For each prompt the label stage labeled and the sample stage sampled, chosen is the teacher's response and rejected
a sample of the student's; with several samples, they are ranked by the teacher's mean log-probability per token
(the sample stage's `token_logprob`: the teacher's score of each sampled token), the lowest first, and the first
`pairs.per_prompt` distinct ones make pairs. A sample identical to the teacher's response makes no pair (a pair
whose two answers are the same teaches nothing) and is counted. Both inputs must come from the same corpus and
tokenizer: otherwise the prompts would not line up, and the stage refuses before writing anything.

The pairs are a pure function of the two inputs, so each run rewrites them whole; the manifest names the labels
and the samples they came from (their fingerprints), the teacher and the student.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import pairs_stage
from pipeline.data.schema import PAIR_SCHEMA, read_manifest, write_json_atomic, write_table_atomic
from pipeline.errors import LabelsError

ROWS_PER_SHARD = 100_000


def _read(folder: str, columns: list[str], stage_name: str) -> pa.Table:
    shards = sorted(Path(folder).glob("part-*.parquet"))
    if not shards:
        raise LabelsError(f"No shards in {storage.portable(folder)}; run ray_jobs/{stage_name}.py with the same "
                          "paths.run_root first.")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in shards])


def _mean(values: list) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if values else float("-inf")


def build_pairs(labels: pa.Table, samples: pa.Table, per_prompt: int) -> tuple[pa.Table, dict[str, int]]:
    """labels (id, prompt_ids, response_ids, token_logprob) and samples (the same and `sample`) → PAIR_SCHEMA rows
    in label order, and the counts of what was paired, dropped and missing."""
    by_id: dict[str, list[tuple[float, int, list[int], list[int]]]] = {}
    for rid, prompt, response, logprobs, j in zip(*(samples.column(c).to_pylist() for c in (
            "id", "prompt_ids", "response_ids", "token_logprob", "sample"))):
        by_id.setdefault(rid, []).append((_mean(logprobs), j, response, prompt))
    out = {name: [] for name in PAIR_SCHEMA.names}
    counts = {"prompts": 0, "pairs": 0, "identical_dropped": 0, "repeated_samples": 0, "without_samples": 0,
              "samples_without_labels": len(set(by_id) - set(labels.column("id").to_pylist()))}
    for rid, prompt, chosen, logprobs in zip(*(labels.column(c).to_pylist() for c in (
            "id", "prompt_ids", "response_ids", "token_logprob"))):
        candidates = sorted(by_id.get(rid, []), key=lambda c: (c[0], c[1]))  # lowest teacher score first
        if not candidates:
            counts["without_samples"] += 1
            continue
        counts["prompts"] += 1
        seen: set[tuple[int, ...]] = set()
        rank = 0
        for score, j, rejected, sample_prompt in candidates:
            if sample_prompt != prompt:
                raise LabelsError(f"The samples of id {rid!r} have another prompt than its labels (different token "
                                  "ids): the labels and the samples were made from different corpora or tokenizers; "
                                  "re-run ray_jobs/sample.py on the labels' corpus.")
            if rejected == chosen:
                counts["identical_dropped"] += 1
                continue
            if tuple(rejected) in seen:
                counts["repeated_samples"] += 1
                continue
            seen.add(tuple(rejected))
            if rank < per_prompt:
                for name, value in zip(PAIR_SCHEMA.names, (rid, prompt, chosen, rejected, _mean(logprobs), score, j,
                                                           rank)):
                    out[name].append(value)
                rank += 1
        counts["pairs"] += rank
    return pa.table(out, schema=PAIR_SCHEMA), counts


def run(cfg: Any) -> dict[str, Any]:
    stage = pairs_stage(cfg)
    paths = stage.paths
    labels_manifest, samples_manifest = read_manifest(paths.labels_dir), read_manifest(paths.samples_dir)
    if samples_manifest.generator is None:
        raise LabelsError(f"{storage.portable(paths.samples_dir)} holds labels, not the student's samples; point "
                          "paths.samples_dir at the sample stage's output.")
    for key, what in (("tokenizer_sha256", "tokenizer"), ("corpus_sha256", "corpus")):
        if getattr(labels_manifest, key) != getattr(samples_manifest, key):
            raise LabelsError(f"The labels ({storage.portable(paths.labels_dir)}) and the samples "
                              f"({storage.portable(paths.samples_dir)}) come from a different {what}; re-run "
                              "ray_jobs/sample.py with the labels' corpus and teacher.")
    columns = ["id", "prompt_ids", "response_ids", "token_logprob"]
    table, counts = build_pairs(_read(paths.labels_dir, columns, "label"),
                                _read(paths.samples_dir, [*columns, "sample"], "sample"), stage.pairs.per_prompt)
    if table.num_rows == 0:
        raise LabelsError(f"No pair could be made ({counts}): every sample equals the teacher's response or no "
                          "prompt has both labels and samples; sample more (sample.n) or at a higher temperature.")
    folder = Path(paths.pairs_dir)
    storage.remove(folder)  # rewritten whole: a pure function of the labels and the samples
    for i, start in enumerate(range(0, table.num_rows, ROWS_PER_SHARD)):
        write_table_atomic(table.slice(start, ROWS_PER_SHARD), folder / f"part-{i:05d}.parquet")
    manifest = {"labels": labels_manifest.fingerprint(), "samples": samples_manifest.fingerprint(),
                "teacher": labels_manifest.teacher, "student": samples_manifest.generator["student"],
                "per_prompt": stage.pairs.per_prompt, "rule": "chosen: the teacher's response; rejected: a student "
                "sample, lowest teacher mean token logprob first; identical pairs dropped", "counts": counts}
    write_json_atomic(folder / "manifest.json", manifest)
    margin = float(np.mean(table.column("chosen_score").to_numpy() - table.column("rejected_score").to_numpy()))
    print(f"pairs: {counts['pairs']} pairs from {counts['prompts']} prompts ({counts['identical_dropped']} samples "
          f"identical to the teacher's response dropped, {counts['repeated_samples']} repeated samples, "
          f"{counts['without_samples']} labeled prompts without samples); the teacher scores chosen above rejected by "
          f"{margin:.3f} nats per token on average\npairs: in {storage.portable(folder)}")
    return {**counts, "mean_score_margin": margin, "pairs_dir": str(folder)}
