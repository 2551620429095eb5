"""The labeled-Parquet contract: one module owns the columns, the soft-label codec and the manifest.

Every stage that reads labels checks them here, at its boundary, so a mismatch is one clear sentence and
not a shape error deep inside a worker. Soft labels are stored compactly (see `encode_topk`): per scored
position the top-k ids sorted ascending and delta-coded, the gaps split into three byte planes (low,
middle, high) so zstd's entropy coder sees each plane's own skew (~15 bits a gap, not 32), their logprobs
as uint8 codes below the position's best logprob (1/8-nat steps, 16 nats deep), and three float16
scalars: the best logprob, the log of the mass outside the top-k (the tail bucket), and the logprob of
the token that actually follows.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import LabelsError

SCHEMA_VERSION = 1
# Logprob codes: gap below the position's best logprob, in steps of 1/8 nat, 128 steps deep (worst-case KL
# error step²/24 = 6.5e-4 nats when the top-k holds all the mass; typically 1e-4). A token 16
# nats below the best carries < 1.2e-7 of its probability, so clipping there costs nothing measurable.
LOGPROB_STEP = 1.0 / 8.0
LOGPROB_CODES = 128
# The tail bucket is floored at this logprob so log(0) never appears when the top-k covers everything.
MIN_TAIL_LOGPROB = -30.0
# Ids are stored in three bytes, so vocabularies up to 16.7M tokens fit (Qwen's is 151,936).
MAX_VOCAB = 1 << 24

LABEL_COLUMNS: dict[str, pa.DataType] = {
    # the corpus row id (unique in a label set)
    "id": pa.string(),
    # where the row came from: input file and 0-based line (jsonl) or row index (Parquet)
    "source": pa.string(),
    "line": pa.int64(),
    # token ids of the prompt (chat template applied) and of the scored response
    "prompt_ids": pa.list_(pa.int32()),
    "response_ids": pa.list_(pa.int32()),
    # per response position: k id gaps (ascending ids, first one absolute), position-major, as 3 byte planes
    "topk_ids": pa.binary(),
    # per response position: k uint8 logprob codes, in the same (ascending id) order
    "topk_codes": pa.binary(),
    # per response position: best logprob, log tail mass, logprob of the actual next token
    "top1_logprob": pa.list_(pa.float16()),
    "tail_logprob": pa.list_(pa.float16()),
    "token_logprob": pa.list_(pa.float16()),
}
LABEL_SCHEMA = pa.schema(list(LABEL_COLUMNS.items()))
# the sample stage's shards: labels of the student's own responses (the teacher's top-k at each position), several
# rows per id, `sample` numbering a prompt's samples (pipeline/label/sample.py)
SAMPLE_SCHEMA = pa.schema(list(LABEL_SCHEMA) + [pa.field("sample", pa.int32())])

# the pairs stage's shards (pipeline/preference): per prompt, the teacher's response (chosen) against one of the
# student's samples (rejected), with the teacher's mean log-probability per token of each; `rank` 0 is the sample
# the teacher scored lowest
PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())), ("chosen_score", pa.float32()), ("rejected_score", pa.float32()),
    ("sample", pa.int32()), ("rank", pa.int32()),
])

REJECT_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string())]
)
# Parquet writer settings for label and rejected shards: zstd everywhere, no dictionaries (ids are near-unique),
# and min/max statistics only on the row-identity columns: statistics of the binary top-k columns are
# useless for pruning and cost ~2.7 bytes per scored token in every shard's footer.
PARQUET_KWARGS = dict(compression="zstd", compression_level=6, use_dictionary=False,
                      write_statistics=["id", "source", "line"])


def encode_topk(ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """Compress one sequence's top-k.

    ids, logprobs: [T, k] (any order within a position, logprobs raw at T=1, float32/64).
    Returns `topk_ids` and `topk_codes` as bytes (3·T·k and T·k), `top1_logprob` and `tail_logprob`
    as float16 [T].
    """
    ids = np.asarray(ids, dtype=np.int64)
    logprobs = np.asarray(logprobs, dtype=np.float64)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    logprobs = np.take_along_axis(logprobs, order, axis=1)
    gaps = np.diff(ids, axis=1, prepend=0).astype("<u4").reshape(-1)
    planes = gaps.view(np.uint8).reshape(-1, 4)[:, :3].T  # little-endian: low, middle, high byte
    top1 = logprobs.max(axis=1)
    codes = np.clip(np.rint((top1[:, None] - logprobs) / LOGPROB_STEP), 0, LOGPROB_CODES).astype(np.uint8)
    mass = np.exp(logprobs).sum(axis=1)
    tail = np.log(np.clip(1.0 - mass, np.exp(MIN_TAIL_LOGPROB), None))
    return {
        "topk_ids": np.ascontiguousarray(planes).tobytes(),
        "topk_codes": codes.tobytes(),
        "top1_logprob": top1.astype(np.float16),
        "tail_logprob": tail.astype(np.float16),
    }


def decode_topk(topk_ids: bytes, topk_codes: bytes, top1_logprob, tail_logprob, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_topk` for one sequence.

    Returns ids int64 [T, k] (ascending within a position, not by rank), logprobs float32 [T, k] and the
    tail logprob float32 [T], renormalised so that exp(logprobs).sum(-1) + exp(tail) == 1 exactly.
    """
    planes = np.frombuffer(topk_ids, dtype=np.uint8).reshape(3, -1).astype(np.int64)
    gaps = (planes[0] | (planes[1] << 8) | (planes[2] << 16)).reshape(-1, k)
    ids = np.cumsum(gaps, axis=1)
    top1 = np.asarray(top1_logprob, dtype=np.float64)[:, None]
    logprobs = top1 - np.frombuffer(topk_codes, dtype=np.uint8).reshape(-1, k).astype(np.float64) * LOGPROB_STEP
    tail = np.asarray(tail_logprob, dtype=np.float64)
    log_z = np.logaddexp(np.logaddexp.reduce(logprobs, axis=1), tail)
    return ids, (logprobs - log_z[:, None]).astype(np.float32), (tail - log_z).astype(np.float32)


def stored_kl_error(ids: np.ndarray, logprobs: np.ndarray) -> float:
    """Mean KL (nats) from the exact top-k+tail distribution to what `decode_topk` gives back; P3's error."""
    enc = encode_topk(ids, logprobs)
    _, dec_lp, dec_tail = decode_topk(enc["topk_ids"], enc["topk_codes"], enc["top1_logprob"],
                                      enc["tail_logprob"], k=ids.shape[1])
    exact = np.take_along_axis(np.asarray(logprobs, np.float64), np.argsort(ids, axis=1, kind="stable"), axis=1)
    exact_tail = np.log(np.clip(1.0 - np.exp(exact).sum(1), np.exp(MIN_TAIL_LOGPROB), None))
    p, p_tail = np.exp(exact), np.exp(exact_tail)
    kl = (p * (exact - dec_lp)).sum(1) + p_tail * (exact_tail - dec_tail)
    return float(kl.mean())


def validate_labels_table(table: pa.Table, where: str) -> None:
    """Raise LabelsError naming the first missing or mistyped column."""
    for name, dtype in LABEL_COLUMNS.items():
        if name not in table.column_names:
            raise LabelsError(f"{where} has no column {name!r}; it was not written by this version of the "
                              f"label stage (schema v{SCHEMA_VERSION}) — re-run the label stage.")
        if table.schema.field(name).type != dtype:
            raise LabelsError(f"{where}: column {name!r} is {table.schema.field(name).type}, expected {dtype}; "
                              "re-run the label stage.")


@dataclass
class Manifest:
    """What a label set was made from; any stage can refuse labels that do not match its own setup."""

    teacher: dict[str, Any]
    tokenizer_sha256: str
    chat_template_sha256: str
    vocab_size: int
    special_tokens: dict[str, Any]
    k: int
    mode: str
    logprobs_mode: str
    max_prompt_tokens: int
    max_response_tokens: int
    max_model_len: int
    sampling: dict[str, Any]
    inputs: list[str]
    packages: dict[str, str]
    codec: dict[str, Any] = field(default_factory=lambda: {
        "name": "topk-idgap-3plane+u8-logprob", "logprob_step": LOGPROB_STEP, "codes": LOGPROB_CODES,
        "min_tail_logprob": MIN_TAIL_LOGPROB})
    schema_version: int = SCHEMA_VERSION
    # the corpus's content (pipeline.generation.reader.corpus_identity: file names, sizes, first bytes), not its paths;
    # None in manifests written before it was recorded
    corpus_sha256: str | None = None
    # who wrote the responses when the teacher only scored them (the sample stage: the student's weights, the
    # samples per prompt and its sampling); None for the teacher's own labels
    generator: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        """Hash of everything that changes the labels' content (not package versions or input paths). A manifest
        without a corpus identity hashes as it did before the identity was recorded."""
        key = {k: v for k, v in asdict(self).items()
               if k not in ("packages", "inputs") and not (k in ("corpus_sha256", "generator") and v is None)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        names = {f.name for f in fields(cls)}  # extra keys (fingerprint, summary) are informational
        return cls(**{k: v for k, v in data.items() if k in names})


def manifest_path(labels_dir: str | Path) -> Path:
    return Path(labels_dir) / "manifest.json"


def read_manifest(labels_dir: str | Path) -> Manifest:
    path = manifest_path(labels_dir)
    if not path.exists():
        raise LabelsError(f"No labels at {labels_dir} (manifest.json missing); run the label stage first.")
    return Manifest.from_json(json.loads(path.read_text()))


def write_manifest(labels_dir: str | Path, manifest: Manifest, extra: dict[str, Any] | None = None) -> Path:
    return write_json_atomic(manifest_path(labels_dir), {**manifest.to_json(), **(extra or {})})


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = True) -> Path:
    """Write JSON under a temporary name and rename it: a reader (or a run killed mid-write) sees the old file or
    the new one, never half of one. Every record a later run trusts (manifests, chain.json, caches) goes this way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # two writers never share a temporary file
    tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, default=str))
    tmp.replace(path)
    storage.published(path)  # at a URI run root too, at once: a later run trusts this record
    return path


def write_table_atomic(table: pa.Table, path: Path) -> int:
    """Write a Parquet shard under a temporary name and rename it, so a shard is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # two attempts at one shard never share a file
    pq.write_table(table, tmp, **PARQUET_KWARGS)
    tmp.replace(path)
    size = path.stat().st_size
    storage.published(path)  # a label shard outlives its node and a killed driver at a URI run root
    return size


def pairs_fingerprint(pairs_dir: str | Path) -> str:
    """What a training run on preference pairs depends on: the labels and samples they were made from and the rule
    (the pairs stage's manifest.json)."""
    path = Path(pairs_dir) / "manifest.json"
    if not path.exists():
        raise LabelsError(f"No pairs at {storage.portable(str(pairs_dir))} (manifest.json missing); run "
                          "ray_jobs/pairs.py with the same paths.run_root first.")
    m = json.loads(path.read_text())
    key = {k: m[k] for k in ("labels", "samples", "per_prompt", "rule")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
