"""Corpora salted with every kind of bad row, reading label shards back for assertions, an independent transformers reference to align against, and label sets
written without an engine (a transformers forward pass of the tiny teacher, in the label contract's codec) for the
tests of the stages downstream of labeling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.corpus import make_rows
from pipeline.data.schema import LOGPROB_STEP, decode_topk, validate_labels_table

CONF = Path(__file__).resolve().parents[1] / "conf"
BAD_LINES = {
    "malformed JSON": b'{"id": "bad-json", "messages": [',
    "missing 'id'": json.dumps({"messages": [{"role": "user", "content": "no id"}]}).encode(),
    "'prompt' must be a string": json.dumps({"id": "wrong-type", "prompt": 42}).encode(),
    "empty prompt": json.dumps({"id": "empty", "prompt": "   "}).encode(),
    "more than label.max_prompt_tokens": json.dumps({"id": "too-long", "prompt": "what is 12 + 34? " * 200}).encode(),
    "not valid UTF-8": b'{"id": "bad-utf8", "prompt": "caf\xe9"}',
    "repeats an earlier row": None,  # filled in below: a second row with the first row's id
}


def write_corpus(folder: Path, n_good: int, with_response: bool, seed: int = 0) -> tuple[list[Path], set[str], int]:
    """A jsonl (good rows + every bad kind) and a Parquet file; returns paths, good ids, rows in total."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_good, seed=seed, with_response=with_response)
    lines = [json.dumps(r).encode() for r in rows]
    dup = dict(rows[0], messages=[{"role": "user", "content": "same id, other text"}])
    for reason, line in BAD_LINES.items():
        line = line if line is not None else json.dumps(dup).encode()
        if with_response and line.startswith(b"{") and b"response" not in line and reason != "malformed JSON":
            try:  # give score-mode rows a response, so each fails for its own reason
                line = json.dumps({**json.loads(line), "response": "ok"}).encode()
            except UnicodeDecodeError:
                pass
        lines.insert(len(lines) // 2, line)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n\n")  # trailing blank lines are not rows
    extra = make_rows(4, seed=seed + 1, with_response=with_response)
    if with_response:  # the chat form of a scored row: the response is the last assistant message
        last = extra.pop()
        extra.append({"id": last["id"], "messages": last["messages"] + [{"role": "assistant", "content": last["response"]}]})
    for r in extra:
        r["messages"] = json.dumps(r["messages"])  # Parquet corpora may store messages as JSON text…
    parquet = folder / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, messages=json.loads(r["messages"])) for r in extra]), parquet)
    good = {r["id"] for r in rows} | {r["id"] for r in extra}
    return [jsonl, parquet], good, len(lines) + len(extra)


def read_dir(folder: Path) -> pa.Table | None:
    shards = sorted(Path(folder).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(s) for s in shards]) if shards else None


def alignment(labels: pa.Table, teacher_dir: Path, k: int) -> dict[str, float]:
    """Compare stored top-k with an fp32 transformers forward pass of the same weights on the same ids."""
    import torch
    from transformers import AutoModelForCausalLM

    validate_labels_table(labels, "labels")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    top1_hits = positions = 0
    max_lp_err = max_tok_err = 0.0
    for row in labels.to_pylist():
        prompt, response = row["prompt_ids"], row["response_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) + len(response) - 1].numpy()
        ids, _, _ = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprob"], row["tail_logprob"], k)
        codes = np.frombuffer(row["topk_codes"], np.uint8).reshape(-1, k)
        top1 = np.asarray(row["top1_logprob"], np.float64)
        for t in range(len(response)):
            positions += 1
            best = int(ref[t].argmax())
            # the reference top-1 is stored, in the best code bucket (codes resolve 1/8 nat)
            top1_hits += int(best in ids[t] and codes[t][list(ids[t]).index(best)] == 0)
            stored = top1[t] - codes[t] * LOGPROB_STEP
            max_lp_err = max(max_lp_err, float(np.abs(stored - ref[t][ids[t]]).max()))
            max_tok_err = max(max_tok_err, abs(float(row["token_logprob"][t]) - float(ref[t][response[t]])))
    return {"top1_agreement": top1_hits / positions, "max_logprob_err": max_lp_err,
            "max_token_logprob_err": max_tok_err, "positions": positions}


def _compose_tiny(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["debug=tiny", f"paths.run_root={root}", *overrides])


def write_labels(root: Path, rows: int, *overrides: str) -> None:
    """Score the bundled corpus's responses with the tiny teacher and write them as a label set, as the label stage
    would in score mode (the rows' ids, sources and lines included), with the label stage's manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import label_stage
    from pipeline.data.schema import LABEL_SCHEMA, encode_topk, write_manifest, write_table_atomic
    from pipeline.label.stage import build_manifest, ensure_corpus

    stage = label_stage(_compose_tiny(root, "label.mode=score", f"data.build.num_rows={rows}", *overrides))
    ensure_corpus(stage)
    manifest = build_manifest(stage)  # builds the tiny teacher
    tok = AutoTokenizer.from_pretrained(stage.teacher.name_or_path)
    teacher = AutoModelForCausalLM.from_pretrained(stage.teacher.name_or_path, dtype=torch.float32).eval()
    columns = {name: [] for name in LABEL_SCHEMA.names}
    corpus = stage.data.paths[0]
    for line, text in enumerate(Path(corpus).read_text().splitlines()):
        row = json.loads(text)
        prompt = list(tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(torch.tensor([prompt + response])).logits[0].double(), -1)
        logprobs = logprobs[len(prompt) - 1: len(prompt) + len(response) - 1]
        top = logprobs.topk(stage.label.k, dim=-1)
        actual = logprobs[torch.arange(len(response)), torch.tensor(response)].numpy().astype(np.float16)
        values = dict(id=row["id"], source=corpus, line=line, prompt_ids=prompt, response_ids=response,
                      token_logprob=actual, **encode_topk(top.indices.numpy(), top.values.numpy()))
        for name in columns:
            columns[name].append(values[name])
    write_table_atomic(pa.table(columns, schema=LABEL_SCHEMA), Path(stage.paths.labels_dir) / "part-00000.parquet")
    write_manifest(stage.paths.labels_dir, manifest)
