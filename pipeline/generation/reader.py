"""Read a corpus (jsonl or Parquet, local or remote) as raw rows that always carry where they came from.

Ray Data's JSON reader fails a whole file on one malformed line; here every line becomes a row holding
its raw bytes plus (source, line), so parsing happens row by row and a bad row is quarantined with its
reason instead of crashing the job or vanishing. (source, line) is also the key that makes resume exact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

RAW_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.binary())])
_ROWS_PER_BLOCK = 4096


class CorpusDatasource(FileBasedDatasource):
    """Rows `{source, line, raw}`: a jsonl line as bytes, or a Parquet row re-encoded as JSON bytes."""

    _FILE_EXTENSIONS = ["jsonl", "json", "parquet"]

    def __init__(self, paths: list[str], **kwargs):
        super().__init__(paths, file_extensions=self._FILE_EXTENSIONS, **kwargs)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = _parquet_lines(f) if path.endswith(".parquet") else _jsonl_lines(f)
        block: list[tuple[int, bytes]] = []
        for item in rows:
            block.append(item)
            if len(block) == _ROWS_PER_BLOCK:
                yield _table(path, block)
                block = []
        if block:
            yield _table(path, block)


def corpus_identity(paths: list[str], head_bytes: int = 1 << 16) -> str:
    """What a corpus is, independent of where it lives: each file's name, size and the sha256 of its first
    `head_bytes` (local paths or any pyarrow filesystem URI; a `*` in a file name is expanded). Cheap enough to
    compute on every run of a large remote corpus, and it changes when a file is replaced, grown or rewritten."""
    import fnmatch
    import hashlib
    import posixpath

    from pyarrow import fs as pafs

    entries = []
    for path in paths:
        if "://" in path:
            filesystem, where = pafs.FileSystem.from_uri(path)
        else:
            filesystem, where = pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())
        parent, name = posixpath.split(where)
        infos = ([i for i in filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
                  if fnmatch.fnmatch(posixpath.basename(i.path), name)] if "*" in name
                 else [filesystem.get_file_info(where)])
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                entries.append([posixpath.basename(info.path), None, None])  # missing: the stage says so later
                continue
            with filesystem.open_input_stream(info.path) as f:
                head = f.read(head_bytes)
            entries.append([posixpath.basename(info.path), info.size, hashlib.sha256(head).hexdigest()])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def count_rows(paths: list[str]) -> int | None:
    """How many rows the corpus holds, as this reader counts them (non-blank jsonl lines, Parquet rows), for a
    progress display's total; None when a file is remote or missing (counting it would mean reading it twice)."""
    import glob

    import pyarrow.parquet as pq

    total = 0
    for pattern in paths:
        if "://" in pattern:
            return None
        files = sorted(glob.glob(str(Path(pattern).expanduser()))) if "*" in pattern else [pattern]
        for path in files:
            if not Path(path).is_file():
                return None
            if path.endswith(".parquet"):
                total += pq.read_metadata(path).num_rows
            else:
                with open(path, "rb") as f:
                    total += sum(1 for line in f if line.strip())
    return total


def _table(path: str, block: list[tuple[int, bytes]]) -> pa.Table:
    lines, raws = zip(*block)
    return pa.table({"source": [path] * len(block), "line": list(lines), "raw": list(raws)}, schema=RAW_SCHEMA)


def _jsonl_lines(f: pa.NativeFile) -> Iterator[tuple[int, bytes]]:
    # Blank lines are layout, not rows (a trailing newline is common), so they are neither read nor counted.
    for number, line in enumerate(f.readall().split(b"\n")):
        if line.strip():
            yield number, line


def _parquet_lines(f: pa.NativeFile) -> Iterator[tuple[int, bytes]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(pa.BufferReader(f.readall())).iter_batches():
        for row in batch.to_pylist():
            yield number, json.dumps(row, default=str).encode()
            number += 1


def parse_row(raw: bytes, mode: str) -> tuple[dict[str, Any] | None, str | None]:
    """Validate one raw row. Returns (row, None), or (None or {"id": ...}, one-line reason): a rejected row keeps
    its id whenever it has a readable one, so the quarantine names it.

    A valid row has `id` (string or integer) and either `messages` (a list of {role, content} strings) or
    `prompt` (a string); score and reference modes also need `response`, or a last message from the assistant.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"
    if not isinstance(row, dict):
        return None, f"a row must be a JSON object, got {type(row).__name__}"
    rid = row.get("id")
    if rid is None:
        return None, "missing 'id'"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None, f"'id' must be a string or an integer, got {type(rid).__name__}"
    out: dict[str, Any] = {"id": str(rid)}
    known = {"id": out["id"]}  # what a rejected row keeps from here on
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return known, "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return known, f"messages[{i}] must have string 'role' and 'content'"
        response = row.get("response")
        if mode != "generate" and response is None and messages[-1]["role"] == "assistant":
            messages, response = messages[:-1], messages[-1]["content"]
        if not messages or not any(m["content"].strip() for m in messages):
            return known, "empty prompt"
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in row:
        if not isinstance(row["prompt"], str):
            return known, f"'prompt' must be a string, got {type(row['prompt']).__name__}"
        if not row["prompt"].strip():
            return known, "empty prompt"
        out["prompt"] = row["prompt"]
        response = row.get("response")
    else:
        return known, "row has neither 'messages' nor 'prompt'"
    if mode != "generate":
        if response is None:
            return known, f"{mode} mode needs a 'response' (or a final assistant message)"
        if not isinstance(response, str):
            return known, f"'response' must be a string, got {type(response).__name__}"
        if not response.strip():
            return known, "empty response"
        out["response"] = response
    return out, None
