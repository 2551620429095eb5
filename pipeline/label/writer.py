"""Last step of the label pipeline: split each batch into labeled and rejected shards and write both.

Each shard is written under a temporary name and renamed, so a run killed at any moment leaves only whole
shards; with the (source, line) key in every row that is what makes resume exactly-once.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import LABEL_SCHEMA, REJECT_SCHEMA, write_table_atomic

STATS_SCHEMA = pa.schema([("labeled", pa.int64()), ("rejected", pa.int64()), ("tokens", pa.int64()),
                          ("bytes", pa.int64()), ("written_at", pa.float64())])


def write_batch(batch: pa.Table, labels_dir: str, rejected_dir: str) -> pa.Table:
    """LABELED rows in; one stats row out (labeled, rejected, scored tokens, label bytes, wall-clock time)."""
    name = f"part-{uuid.uuid4().hex}.parquet"
    bad = pc.is_valid(batch.column("reason"))
    good = batch.filter(pc.invert(bad)).select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
    rejected = batch.filter(bad).select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    nbytes = tokens = 0
    if good.num_rows:
        nbytes = write_table_atomic(good, Path(labels_dir) / name)
        tokens = int(pc.sum(pc.list_value_length(good.column("response_ids"))).as_py())
    if rejected.num_rows:
        write_table_atomic(rejected, Path(rejected_dir) / name)
    return pa.table({"labeled": [good.num_rows], "rejected": [rejected.num_rows], "tokens": [tokens],
                     "bytes": [nbytes], "written_at": [time.time()]}, schema=STATS_SCHEMA)
