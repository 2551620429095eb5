"""CPU step before the engine: parse, apply the chat template, tokenize once, and check every limit.

The ids produced here are the ids the teacher scores and the student trains on; nothing downstream
tokenizes again. Rows that fail a check keep flowing with a `reason` so the writer can quarantine them,
and (when the run keeps one) a small ledger actor skips rows finished by an earlier run and refuses repeated ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.generation.reader import parse_row

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("line", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.int32())), ("reason", pa.string()),
])


@dataclass(frozen=True)
class PrepareSpec:
    tokenizer: str
    revision: str | None
    mode: str
    max_prompt_tokens: int
    max_response_tokens: int
    max_model_len: int
    # the config group the limits come from, for the reasons rows are refused with ("label", "evaluate")
    setting: str = "label"


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    storage.fetched(name_or_path)  # a model in a URI run root's mirror, on this task's node

    return AutoTokenizer.from_pretrained(name_or_path, revision=revision)


def tokenize_row(row: dict, spec: PrepareSpec) -> tuple[list[int], list[int], str | None]:
    """(prompt_ids, response_ids, reason); the response ends with the tokenizer's end-of-turn token."""
    tok = load_tokenizer(spec.tokenizer, spec.revision)
    if "messages" in row:
        prompt_ids = list(tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    else:
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > spec.max_prompt_tokens:
        return [], [], (f"prompt is {len(prompt_ids)} tokens, more than {spec.setting}.max_prompt_tokens="
                        f"{spec.max_prompt_tokens}")
    response_ids: list[int] = []
    if spec.mode != "generate":  # score, reference: the corpus's own response
        response_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            response_ids.append(tok.eos_token_id)
        if len(response_ids) > spec.max_response_tokens:
            return [], [], (f"response is {len(response_ids)} tokens, more than {spec.setting}.max_response_tokens="
                            f"{spec.max_response_tokens}")
        if len(prompt_ids) + len(response_ids) > spec.max_model_len:
            return [], [], (f"prompt + response is {len(prompt_ids) + len(response_ids)} tokens, more than the "
                            f"teacher's max_model_len={spec.max_model_len}")
    return prompt_ids, response_ids, None


def prepare_batch(batch: pa.Table, spec: PrepareSpec, ledger=None) -> pa.Table:
    """RAW_SCHEMA rows in, PREPARED_SCHEMA rows out; with a `Ledger`, rows an earlier run finished are dropped and
    a repeated id is refused (without one, e.g. evaluation's fresh held-out rows, every row goes on)."""
    out = {name: [] for name in PREPARED_SCHEMA.names}
    for source, line, raw in zip(*(batch.column(c).to_pylist() for c in ("source", "line", "raw"))):
        row, reason = parse_row(raw, spec.mode)  # a rejected row may still carry its id
        prompt_ids, response_ids = [], []
        if reason is None:
            prompt_ids, response_ids, reason = tokenize_row(row, spec)
        for name, value in zip(PREPARED_SCHEMA.names, (row["id"] if row else None, source, line, prompt_ids,
                                                        response_ids, reason)):
            out[name].append(value)
    if ledger is None:
        return pa.table(out, schema=PREPARED_SCHEMA)
    status = ray.get(ledger.claim.remote(out["source"], out["line"], out["id"], out["reason"]))
    for i, s in enumerate(status):
        if s == "duplicate":
            out["reason"][i] = f"id {out['id'][i]!r} repeats an earlier row"
            out["prompt_ids"][i], out["response_ids"][i] = [], []
    keep = [i for i, s in enumerate(status) if s != "done"]
    return pa.table({k: [v[i] for i in keep] for k, v in out.items()}, schema=PREPARED_SCHEMA)


class RowLedger:
    """Which rows are finished (from shards already on disk) and which ids are taken, for one run; the `Ledger`
    actor holds one. Claiming is idempotent: a row that claims its own id again (a prepare task that Ray retries
    after it claimed) is not a duplicate of itself."""

    def __init__(self, labels_dir: str, rejected_dir: str):
        self.done: set[tuple[str, int]] = set()
        self.ids: dict[str, tuple[str, int]] = {}  # id → the row (source, line) that holds it
        for folder, take_ids in ((labels_dir, True), (rejected_dir, False)):
            storage.pull(folder)  # at a URI run root, this node's copy is made what the run root holds
            for shard in sorted(Path(folder).glob("part-*.parquet")):
                t = pq.read_table(shard, columns=["source", "line", "id"])
                keys = list(zip(t.column("source").to_pylist(), t.column("line").to_pylist()))
                self.done.update(keys)
                if take_ids:
                    self.ids.update(zip(t.column("id").to_pylist(), keys))
        self.resumed = len(self.done)

    def claim(self, sources: list[str], lines: list[int], ids: list[str | None], reasons: list[str | None]):
        """Per row: "done" (finished by an earlier run), "duplicate" (id taken by another row) or "ok"."""
        status = []
        for key, rid, reason in zip(zip(sources, lines), ids, reasons):
            if key in self.done:
                status.append("done")
            elif reason is None and self.ids.setdefault(rid, key) != key:
                status.append("duplicate")
            else:
                status.append("ok")
        return status

    def resumed_rows(self) -> int:
        return self.resumed


Ledger = ray.remote(num_cpus=0)(RowLedger)
