"""Last step of the label pipeline: split each batch into labeled and rejected shards and write both.

Each shard is written under a temporary name and renamed, so a run killed at any moment leaves only whole
shards; with the (source, line) key in every row that is what makes resume exactly-once. A shard's name follows
from the keys of its rows, so a write task that Ray retries after it wrote (its worker or node lost) replaces its
own shard rather than adding a second copy of the rows.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import LABEL_SCHEMA, REJECT_SCHEMA, write_table_atomic

# one engine call: the actor that made it, when it ran (wall clock) and the tokens it scored
ENGINE_CALL = pa.struct([("actor", pa.string()), ("started", pa.float64()), ("finished", pa.float64()),
                         ("tokens", pa.int64())])
STATS_SCHEMA = pa.schema([("labeled", pa.int64()), ("rejected", pa.int64()), ("tokens", pa.int64()),
                          ("bytes", pa.int64()), ("written_at", pa.float64()),
                          ("engine_calls", pa.list_(ENGINE_CALL))])
_CALL_KEYS = ["engine_actor", "engine_started", "engine_finished"]


def write_batch(batch: pa.Table, labels_dir: str, rejected_dir: str, schema: pa.Schema = LABEL_SCHEMA) -> pa.Table:
    """LABELED rows in (`schema`'s columns and a reason); one stats row out (labeled, rejected, scored tokens, label
    bytes, wall-clock time, and the engine calls that labeled these rows)."""
    name = shard_name(batch)
    bad = pc.is_valid(batch.column("reason"))
    labeled = batch.filter(pc.invert(bad))
    good = labeled.select(schema.names).cast(schema)
    rejected = batch.filter(bad).select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    nbytes = tokens = 0
    calls = []
    if good.num_rows:
        nbytes = write_table_atomic(good, Path(labels_dir) / name)
        lengths = pc.list_value_length(good.column("response_ids"))
        tokens = int(pc.sum(lengths).as_py())
        per_call = (labeled.select(_CALL_KEYS).append_column("tokens", lengths)
                    .filter(pc.is_valid(labeled.column("engine_actor")))  # reference mode runs no engine
                    .group_by(_CALL_KEYS).aggregate([("tokens", "sum")]))
        calls = [{"actor": r["engine_actor"], "started": r["engine_started"], "finished": r["engine_finished"],
                  "tokens": r["tokens_sum"]} for r in per_call.to_pylist()]
    if rejected.num_rows:
        write_table_atomic(rejected, Path(rejected_dir) / name)
    return pa.table({"labeled": [good.num_rows], "rejected": [rejected.num_rows], "tokens": [tokens],
                     "bytes": [nbytes], "written_at": [time.time()], "engine_calls": [calls]}, schema=STATS_SCHEMA)


def shard_name(batch: pa.Table) -> str:
    """The same rows, the same name: a digest of the batch's (source, line) keys in order."""
    digest = hashlib.sha256()
    for source, line in zip(batch.column("source").to_pylist(), batch.column("line").to_pylist()):
        digest.update(f"{source}\0{line}\n".encode())
    return f"part-{digest.hexdigest()[:32]}.parquet"
