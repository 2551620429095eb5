"""Which labeled rows the quantize stage calibrates on and which it holds out for the quality gate.

The split is a pure function of each row's id (a hash), so it is the same on every machine and every
re-run, needs no state, and a later stage (evaluate) can reproduce it from the rule in the manifest.
Calibration rows never come from the held-out part.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schema import validate_labels_table
from pipeline.data.split import SPLIT_RULE, is_heldout  # noqa: F401 - the train stage holds out the same rows
from pipeline.errors import LabelsError

# Columns the gate needs from the label contract (pipeline/data/schema.py); calibration needs the first three.
REQUIRED_COLUMNS = ["id", "prompt_ids", "response_ids", "topk_ids", "topk_codes", "top1_logprob", "tail_logprob"]

def label_shards(labels_dir: str) -> list[Path]:
    shards = sorted(Path(labels_dir).glob("part-*.parquet"))
    if not shards:
        raise LabelsError(f"No label shards in {labels_dir}; run ray_jobs/label.py with the same paths.run_root "
                          "first (the gate and the calibration both read them).")
    validate_labels_table(pq.read_schema(shards[0]).empty_table(), str(shards[0]))
    return shards


def split_rows(labels_dir: str, fraction: float, max_heldout: int, max_calibration: int) -> tuple[pa.Table, pa.Table]:
    """(held-out rows, calibration rows), in shard order, each capped; reads only what it keeps."""
    held, calib = [], []
    n_held = n_calib = 0
    for shard in label_shards(labels_dir):
        ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
        mask = [is_heldout(i, fraction) for i in ids]
        want_held, want_calib = max_heldout - n_held, max_calibration - n_calib
        if want_held <= 0 and want_calib <= 0:
            break
        table = pq.read_table(shard, columns=REQUIRED_COLUMNS)
        h = [i for i, m in enumerate(mask) if m][:max(0, want_held)]
        c = [i for i, m in enumerate(mask) if not m][:max(0, want_calib)]
        held.append(table.take(pa.array(h, pa.int64())))
        calib.append(table.take(pa.array(c, pa.int64())))
        n_held, n_calib = n_held + len(h), n_calib + len(c)
    if n_held == 0:
        raise LabelsError(f"No labeled row in {labels_dir} falls in the held-out split (heldout_fraction="
                          f"{fraction}); label more rows or raise the fraction.")
    return pa.concat_tables(held), (pa.concat_tables(calib) if n_calib else held[0].slice(0, 0))


def calibration_examples(rows: pa.Table, max_tokens: int) -> list[dict[str, Any]]:
    """Prompt + teacher response token ids (cut from the left to max_tokens), as GPTQModel takes them:
    the exact ids the student was trained on, so nothing is re-tokenized."""
    examples = []
    for prompt, response in zip(rows.column("prompt_ids").to_pylist(), rows.column("response_ids").to_pylist()):
        ids = (prompt + response)[-max_tokens:]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return examples


def split_record(held: pa.Table, calib: pa.Table, fraction: float) -> dict[str, Any]:
    """What the manifest records about the split, enough to reproduce and to check it."""
    def digest(table: pa.Table) -> str:
        return hashlib.sha256("\n".join(sorted(table.column("id").to_pylist())).encode()).hexdigest()[:16]

    return {"rule": SPLIT_RULE, "heldout_fraction": fraction, "heldout_rows": held.num_rows,
            "heldout_ids_sha256": digest(held), "calibration_rows": calib.num_rows,
            "calibration_ids_sha256": digest(calib)}
